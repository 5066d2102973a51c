"""Collect every run's result JSON into results/tables/runs.csv, and list skipped files in skipped.csv."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../src")  # noqa: F821

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from lora_expressivity.aggregate import load_records, unexpected_files  # noqa: E402
from lora_expressivity.workflow import log_to, write_table  # noqa: E402

log = log_to(snakemake.log[0])  # noqa: F821
paths = list(snakemake.input.runs)  # noqa: F821
expected = {Path(path).stem for path in paths}

table, unreadable = load_records(paths, expected_ids=expected)
# NOTE: the runs folder is not an input, so a file added to it without other changes
# is listed only when this rule runs again (snakemake --forcerun runs_table).
unexpected = unexpected_files("results/runs", expected)
skipped = [*unreadable, *unexpected]

provenance = {"config": snakemake.config, "config_files": snakemake.params.config_files}  # noqa: F821
write_table(snakemake.output.table, table, records=table, skipped=skipped,  # noqa: F821
            description="one row per run of the grid: settings, metrics (diverged marks non-finite losses) "
                        "and the commit of the code that trained it", **provenance)
write_table(snakemake.output.skipped, pd.DataFrame(skipped, columns=["path", "reason"]),  # noqa: F821
            description="files in results/runs that the tables leave out, and why", **provenance)
log.info("wrote %d runs; skipped %d unreadable and %d unexpected files (listed in %s)",
         len(table), len(unreadable), len(unexpected), snakemake.output.skipped)  # noqa: F821
