# Tables: every run, and per figure the paper's selection (best of the sweep per
# cell, median over seeds).


rule runs_table:
    input:
        runs=[run.path for run in RUNS],
        code=TABLE_CODE,
    output:
        "results/tables/runs.csv",
    log:
        "logs/aggregate/runs_table.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/workflow.yaml"
    script:
        "../scripts/aggregate_runs.py"


rule figure_table:
    input:
        runs=figure_table_inputs,
        code=TABLE_CODE,
    output:
        summary="results/tables/{figure}.csv",
        selected="results/tables/{figure}_runs.csv",
    wildcard_constraints:
        figure="|".join(FIGURES),
    log:
        "logs/aggregate/{figure}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/workflow.yaml"
    script:
        "../scripts/figure_table.py"


rule rank_step_table:
    input:
        runs=runs_of_rank_steps(),
        code=TABLE_CODE,
    output:
        csv="results/tables/rank_steps.csv",
        markdown="results/tables/rank_steps.md",
    log:
        "logs/aggregate/rank_steps.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/workflow.yaml"
    script:
        "../scripts/rank_step_table.py"
