"""Write the expanded grid, one row per run, to results/configs/runs.tsv."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../src")  # noqa: F821

from lora_expressivity.grid import expand_grid, runs_table  # noqa: E402
from lora_expressivity.results import atomic_write_text  # noqa: E402
from lora_expressivity.workflow import log_to  # noqa: E402

log = log_to(snakemake.log[0])  # noqa: F821
table = runs_table(expand_grid(snakemake.config))  # noqa: F821
atomic_write_text(snakemake.output[0], table.to_csv(sep="\t", index=False))  # noqa: F821
log.info("wrote %d runs to %s", len(table), snakemake.output[0])  # noqa: F821
