# Figures: a PDF and a PNG per figure, drawn from its table of selected runs. The
# report shows the PNG, which every browser displays inline; the PDF is for print.


rule figure:
    input:
        selected="results/tables/{figure}_runs.csv",
        code=PLOT_CODE,
    output:
        pdf="figures/{figure}.pdf",
        png=report(
            "figures/{figure}.png",
            caption="../report/figure.rst",
            category="Figures",
            labels={"figure": "{figure}"},
        ),
    params:
        claim=lambda wildcards: FIGURES[wildcards.figure].caption,
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
