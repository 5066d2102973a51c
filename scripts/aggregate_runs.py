"""Collect every run's result JSON into results/tables/runs.csv."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../src")  # noqa: F821

from pathlib import Path  # noqa: E402

from lora_expressivity.aggregate import load_records  # noqa: E402
from lora_expressivity.results import atomic_write_text  # noqa: E402
from lora_expressivity.workflow import log_to  # noqa: E402

log = log_to(snakemake.log[0])  # noqa: F821
paths = list(snakemake.input.runs)  # noqa: F821
expected = {Path(path).stem for path in paths}
runs_folder = Path("results/runs")
foreign = sorted(str(path) for path in runs_folder.glob("*.json") if path.stem not in expected)
for path in foreign:
    log.warning("skipped %s: its configuration is not in the current grid", path)

table, skipped = load_records(paths, expected_ids=expected)
atomic_write_text(snakemake.output[0], table.to_csv(index=False))  # noqa: F821
log.info("wrote %d runs; skipped %d unreadable and %d foreign files", len(table), len(skipped), len(foreign))
