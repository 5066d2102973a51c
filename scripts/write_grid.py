"""Write the expanded grid, one row per run, to results/configs/runs.tsv."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../src")  # noqa: F821

from lora_expressivity.grid import expand_grid, runs_table  # noqa: E402
from lora_expressivity.workflow import log_to, write_table  # noqa: E402

log = log_to(snakemake.log[0])  # noqa: F821
table = runs_table(expand_grid(snakemake.config))  # noqa: F821
write_table(snakemake.output.table, table, sep="\t", config=snakemake.config,  # noqa: F821
            config_files=snakemake.params.config_files,  # noqa: F821
            description="the expanded grid: one row per run with its id, experiments, result path and settings")
log.info("wrote %d runs to %s", len(table), snakemake.output.table)  # noqa: F821
