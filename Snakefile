# Reproduction of the synthetic experiments of Zeng & Lee, "The Expressive Power
# of Low-Rank Adaptation" (ICLR 2024): grid -> training batches -> tables -> figures.
from snakemake.utils import min_version

min_version("8.0")


report: "report/workflow.rst"


# A grid given with --configfile replaces the default one instead of being merged
# into it, because merged experiment lists would mix two grids.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"



include: "rules/common.smk"

# Light rules run where Snakemake runs, so a cluster queue only sees training jobs.
localrules:
    all,
    runs_table_of_grid,
    runs_table,
    figure_table,
    rank_step_table,
    figure,


rule all:
    input:
        final_outputs(),
    default_target: True


include: "rules/grid.smk"
include: "rules/train.smk"
include: "rules/aggregate.smk"
include: "rules/figures.smk"
