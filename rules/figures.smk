# Figures: a PDF and a PNG per figure, drawn from its table of selected runs.


rule figure:
    input:
        selected="results/tables/{figure}_runs.csv",
        code=PLOT_CODE,
    output:
        pdf=report(
            "figures/{figure}.pdf",
            caption="../report/figure.rst",
            category="Figures",
            labels={"figure": "{figure}"},
        ),
        png="figures/{figure}.png",
    params:
        config_files=CONFIG_FILES,
        runs_hash=figure_runs_hash,
    wildcard_constraints:
        figure="|".join(FIGURES),
    log:
        "logs/figures/{figure}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/workflow.yaml"
    script:
        "../scripts/plot_figure.py"
