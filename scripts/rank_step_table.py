"""Tabulate MSE and tunable parameters per rank_step (CSV and Markdown)."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../src")  # noqa: F821

from lora_expressivity.aggregate import load_records  # noqa: E402
from lora_expressivity.figures import markdown_table, rank_step_table  # noqa: E402
from lora_expressivity.results import atomic_write_text  # noqa: E402
from lora_expressivity.workflow import log_to, table_provenance, write_table  # noqa: E402

log = log_to(snakemake.log[0])  # noqa: F821
records, skipped = load_records(snakemake.input.runs)  # noqa: F821
table = rank_step_table(records)

provenance = {"config": snakemake.config, "config_files": snakemake.params.config_files,  # noqa: F821
              "records": records, "skipped": skipped,
              "description": "test MSE over seeds and tunable parameters per rank and rank_step, target depth 2 "
                             "on frozen depth 4; n_diverged counts the runs left out because they diverged"}
write_table(snakemake.output.csv, table, **provenance)  # noqa: F821
origin = table_provenance(snakemake.output.markdown, table, **provenance)  # noqa: F821
footer = (f"\nConfiguration {', '.join(origin['config_files'])} (grid {origin['grid_hash']}), "
          f"written by lora-expressivity {origin['written_by']['package_version']} at commit "
          f"{origin['written_by']['git_commit']}{' (dirty)' if origin['written_by']['git_dirty'] else ''}.\n")
atomic_write_text(snakemake.output.markdown, markdown_table(table) + footer)  # noqa: F821
log.info("rank-step table with %d rows", len(table))
