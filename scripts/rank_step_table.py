"""Tabulate MSE and tunable parameters per rank_step (CSV and Markdown)."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../src")  # noqa: F821

from lora_expressivity.aggregate import load_records  # noqa: E402
from lora_expressivity.figures import markdown_table, rank_step_table  # noqa: E402
from lora_expressivity.results import atomic_write_text  # noqa: E402
from lora_expressivity.workflow import log_to  # noqa: E402

log = log_to(snakemake.log[0])  # noqa: F821
records, skipped = load_records(snakemake.input.runs)  # noqa: F821
table = rank_step_table(records)
atomic_write_text(snakemake.output.csv, table.to_csv(index=False))  # noqa: F821
atomic_write_text(snakemake.output.markdown, markdown_table(table))  # noqa: F821
log.info("rank-step table with %d rows", len(table))
