# Configuration checks, the expanded grid and the input functions of the other rules.
import hashlib
import json
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

ROOT = Path(workflow.basedir)
sys.path.insert(0, str(ROOT / "src"))

from lora_expressivity.config import ConfigError
from lora_expressivity.figures import FIGURES, feeds, matches
from lora_expressivity.grid import DEFAULT_BATCH_OVER, make_batches
from lora_expressivity.workflow import check_config, grid_hash

try:
    RUNS = check_config(config, ROOT / "config" / "schema.yaml")
except ConfigError as error:
    raise WorkflowError(f"Invalid configuration: {error}") from None

BATCHING = config.get("batching", {})
BATCHES = make_batches(
    RUNS,
    batch_over=tuple(BATCHING.get("batch_over", DEFAULT_BATCH_OVER)),
    max_members=BATCHING.get("max_members", 256),
)
CONFIG_FILES = ",".join(str(path) for path in workflow.configfiles) or "config/config.yaml"
GRID_HASH = grid_hash(config)
TRAIN = {"device": "auto", "threads": 1, "gpu": 0, "mem_mb": 2000, "runtime": 120, **config.get("train", {})}
SELECTED_FIGURES = config.get("figures", [*FIGURES, "rank_steps"])


def package_sources(*modules):
    """Package modules a rule depends on, so that editing one reruns that rule."""
    return [str(ROOT / "src" / "lora_expressivity" / f"{module}.py") for module in modules]


TRAINING_CODE = package_sources(
    "config", "models", "construction", "training", "experiment", "engine", "devices", "results"
)
TABLE_CODE = package_sources("aggregate", "figures")
PLOT_CODE = [*package_sources("figures"), str(ROOT / "scripts" / "plot_figure.py")]


def runs_of_figure(figure):
    spec = FIGURES[figure]
    return [run.path for run in RUNS if matches(run.config.to_dict(), spec)]


def runs_of_rank_steps():
    return [run.path for run in RUNS if feeds("rank_steps", run.config.to_dict())]


def figure_table_inputs(wildcards):
    return runs_of_figure(wildcards.figure)


def figure_runs_hash(wildcards):
    """Hash of the runs a figure draws, so that its metadata changes only when they do."""
    run_ids = sorted(Path(path).stem for path in runs_of_figure(wildcards.figure))
    return hashlib.sha256(json.dumps(run_ids).encode()).hexdigest()[:12]


def final_outputs():
    outputs = ["results/configs/runs.tsv", "results/tables/runs.csv"]
    for figure in SELECTED_FIGURES:
        if figure == "rank_steps":
            outputs += ["results/tables/rank_steps.csv", "results/tables/rank_steps.md"]
        else:
            outputs += [f"figures/{figure}.pdf", f"figures/{figure}.png", f"results/tables/{figure}.csv"]
    return outputs
