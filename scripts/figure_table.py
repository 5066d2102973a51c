"""Select each cell's best run and summarise one figure's curves over seeds."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../src")  # noqa: F821

from lora_expressivity.aggregate import diverged_mask, load_records  # noqa: E402
from lora_expressivity.figures import FIGURES, figure_runs, figure_summary  # noqa: E402
from lora_expressivity.workflow import log_to, write_table  # noqa: E402

log = log_to(snakemake.log[0])  # noqa: F821
figure = FIGURES[snakemake.wildcards.figure]  # noqa: F821
records, skipped = load_records(snakemake.input.runs)  # noqa: F821
selected = figure_runs(records, figure)
summary = figure_summary(selected)

provenance = {"config": snakemake.config, "config_files": snakemake.params.config_files,  # noqa: F821
              "records": records, "skipped": skipped}
write_table(snakemake.output.selected, selected, **provenance,  # noqa: F821
            description=f"runs of {figure.name}: the best run of each cell's sweep per seed, plus the runs "
                        f"that diverged (diverged=True), which no curve uses")
write_table(snakemake.output.summary, summary, **provenance,  # noqa: F821
            description=f"curves of {figure.name}: median, quartiles and range of the test MSE over seeds per "
                        f"panel, curve and x; n_diverged counts the runs left out because they diverged")
diverged = int(diverged_mask(selected).sum()) if not selected.empty else 0
log.info("%s: %d runs read, %d selected, %d diverged, %d curve points, %d files skipped", figure.name,
         len(records), len(selected) - diverged, diverged, len(summary), len(skipped))
