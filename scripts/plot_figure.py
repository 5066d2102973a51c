"""Render one figure to a PDF and a PNG from its table of selected runs."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../src")  # noqa: F821

import pandas as pd  # noqa: E402

from lora_expressivity.figures import FIGURES, plot_figure  # noqa: E402
from lora_expressivity.workflow import figure_metadata, log_to  # noqa: E402

log = log_to(snakemake.log[0])  # noqa: F821
figure = FIGURES[snakemake.wildcards.figure]  # noqa: F821
try:
    selected = pd.read_csv(snakemake.input.selected)  # noqa: F821
except pd.errors.EmptyDataError:
    selected = pd.DataFrame()
metadata = figure_metadata(snakemake.params.config_files, snakemake.params.runs_hash)  # noqa: F821
plot_figure(selected, figure, snakemake.output.pdf, snakemake.output.png, metadata)  # noqa: F821
log.info("drew %s from %d selected runs", figure.name, len(selected))
