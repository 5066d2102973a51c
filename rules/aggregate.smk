# Tables: every run, and per figure the paper's selection (best of the sweep per
# cell, median over seeds). Every table has a provenance sidecar <table>.meta.json.


rule runs_table:
    input:
        runs=[run.path for run in RUNS],
        code=TABLE_CODE,
    output:
        table=report(
            "results/tables/runs.csv",
            caption="../report/runs.rst",
            category="Tables",
            subcategory="Runs",
            labels={"table": "runs"},
        ),
        table_meta="results/tables/runs.csv.meta.json",
        skipped=report(
            "results/tables/skipped.csv",
            caption="../report/skipped.rst",
            category="Tables",
            subcategory="Runs",
            labels={"table": "skipped files"},
        ),
        skipped_meta="results/tables/skipped.csv.meta.json",
    params:
        config_files=CONFIG_FILES,
        grid_hash=GRID_HASH,
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
        summary=report(
            "results/tables/{figure}.csv",
            caption="../report/figure_summary.rst",
            category="Tables",
            subcategory="Figures",
            labels={"figure": "{figure}", "table": "curve summary"},
        ),
        summary_meta="results/tables/{figure}.csv.meta.json",
        selected=report(
            "results/tables/{figure}_runs.csv",
            caption="../report/figure_runs.rst",
            category="Tables",
            subcategory="Figures",
            labels={"figure": "{figure}", "table": "selected runs"},
        ),
        selected_meta="results/tables/{figure}_runs.csv.meta.json",
    params:
        config_files=CONFIG_FILES,
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
        csv=report(
            "results/tables/rank_steps.csv",
            caption="../report/rank_steps.rst",
            category="Tables",
            subcategory="Rank steps",
            labels={"table": "rank steps", "format": "CSV"},
        ),
        csv_meta="results/tables/rank_steps.csv.meta.json",
        markdown=report(
            "results/tables/rank_steps.md",
            caption="../report/rank_steps.rst",
            category="Tables",
            subcategory="Rank steps",
            labels={"table": "rank steps", "format": "Markdown"},
        ),
    params:
        config_files=CONFIG_FILES,
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
