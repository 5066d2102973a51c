# The grid expanded into one row per run, for reading and for other tools.


rule runs_table_of_grid:
    output:
        table=report(
            "results/configs/runs.tsv",
            caption="../report/grid.rst",
            category="Tables",
            subcategory="Runs",
            labels={"table": "grid"},
        ),
        table_meta="results/configs/runs.tsv.meta.json",
    params:
        run_ids=[run.run_id for run in RUNS],
        config_files=CONFIG_FILES,
        grid_hash=GRID_HASH,
    log:
        "logs/grid/runs_table.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/workflow.yaml"
    script:
        "../scripts/write_grid.py"
