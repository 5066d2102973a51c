"""Select each cell's best run and summarise one figure's curves over seeds."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../src")  # noqa: F821

from lora_expressivity.aggregate import load_records  # noqa: E402
from lora_expressivity.figures import FIGURES, figure_runs, figure_summary  # noqa: E402
from lora_expressivity.results import atomic_write_text  # noqa: E402
from lora_expressivity.workflow import log_to  # noqa: E402

log = log_to(snakemake.log[0])  # noqa: F821
figure = FIGURES[snakemake.wildcards.figure]  # noqa: F821
records, skipped = load_records(snakemake.input.runs)  # noqa: F821
selected = figure_runs(records, figure)
summary = figure_summary(selected)
atomic_write_text(snakemake.output.selected, selected.to_csv(index=False))  # noqa: F821
atomic_write_text(snakemake.output.summary, summary.to_csv(index=False))  # noqa: F821
log.info("%s: %d runs read, %d selected, %d curve points", figure.name, len(records), len(selected), len(summary))
