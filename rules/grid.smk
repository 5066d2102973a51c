# The grid expanded into one row per run, for reading and for other tools.


rule runs_table_of_grid:
    output:
        "results/configs/runs.tsv",
    params:
        run_ids=[run.run_id for run in RUNS],
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
