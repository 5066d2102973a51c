"""Malformed workflow configurations: each is rejected before any job runs, with a message naming the key and the fix.

Every case goes through lora_expressivity.workflow.check_config, the function that
rules/common.smk calls while Snakemake parses the workflow. A representative subset
also runs `snakemake -n` on a configuration file in a temporary folder.
"""

import copy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lora_expressivity.config import ConfigError  # noqa: E402
from lora_expressivity.workflow import check_config  # noqa: E402

SCHEMA = ROOT / "config" / "schema.yaml"
# The tiny grid has every experiment type (linear, ReLU, final layers, rank steps, transformer).
BASE = yaml.safe_load((ROOT / "tests" / "data" / "tiny.yaml").read_text())
DELETE = object()


def change(*edits):
    """Return a copy of the base configuration with (key path, value) edits; DELETE removes the key."""
    config = copy.deepcopy(BASE)
    for path, value in edits:
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        if value is DELETE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return config


def linear_only(**top_level):
    """The base configuration with only its linear experiment, plus the given top-level keys."""
    config = change((["experiments"], {"linear": BASE["experiments"]["linear"]}))
    config.update(top_level)
    return config


# (case id, configuration, fragments the message must contain: the key's path and the fix)
CASES = [
    # Unknown keys, at every level.
    ("unknown top-level key", change((["figure"], ["figure1"])), ["figure is not a known key", "'figures'"]),
    ("unknown shared key", change((["shared", "widht"], 4)), ["shared.widht", "did you mean 'width'", "remove it"]),
    ("unknown experiment key", change((["experiments", "linear", "rnak"], 2)),
     ["experiments.linear.rnak", "did you mean 'rank'"]),
    ("unknown method key", change((["experiments", "linear", "methods", "sgd"], {"learning_rate": 0.1})),
     ["experiments.linear.methods.sgd.learning_rate", "remove it", "lr"]),
    ("unknown sweep key", change((["sweep", "lrs"], [0.1])), ["sweep.lrs", "did you mean 'lr'"]),
    ("unknown batching key", change((["batching"], {"batch_size": 3})), ["batching.batch_size", "batch_over"]),
    ("unknown train key", change((["train", "gpus"], 1)), ["train.gpus", "did you mean 'gpu'"]),
    # Wrong types.
    ("width as string", change((["shared", "width"], "16")), ["shared.width", "positive integer", "'16' (a string)"]),
    ("width as float", change((["shared", "width"], 4.5)), ["shared.width", "positive integer", "4.5"]),
    ("seeds as scalar", change((["seeds"], 0)), ["seeds must be a list"]),
    ("method settings as number", change((["experiments", "linear", "methods", "sgd"], 3)),
     ["experiments.linear.methods.sgd", "a mapping", "got 3"]),
    ("batch_over as string", change((["batching"], {"batch_over": "rank"})), ["batching.batch_over must be a list"]),
    ("depths not pairs", change((["experiments", "relu", "depths"], [1, 2])),
     ["experiments.relu.depths[0] must be a list", "[target_depth, frozen_depth] pairs"]),
    ("depths triple", change((["experiments", "relu", "depths"], [[1, 2, 3]])),
     ["experiments.relu.depths[0]", "at most 2 items"]),
    # Empty lists and mappings, missing keys.
    ("empty seeds", change((["seeds"], [])), ["seeds is an empty list", "at least one value"]),
    ("empty rank list", change((["experiments", "linear", "rank"], [])),
     ["experiments.linear.rank is an empty list", "at least one value"]),
    ("no experiments", change((["experiments"], {})), ["experiments is empty", "add at least one"]),
    ("empty methods", change((["experiments", "linear", "methods"], {})),
     ["experiments.linear.methods is empty", "add at least one"]),
    ("experiment without methods", change((["experiments", "linear", "methods"], DELETE)),
     ["experiments.linear is missing the key 'methods'"]),
    ("missing experiments", change((["experiments"], DELETE)), ["missing the key 'experiments'"]),
    # Negative or zero sizes and rates.
    ("zero width", change((["shared", "width"], 0)), ["shared.width must be at least 1", "got 0"]),
    ("negative width", change((["shared", "width"], -4)), ["shared.width must be at least 1", "got -4"]),
    ("zero epochs", change((["shared", "n_epochs"], 0)), ["shared.n_epochs must be at least 1"]),
    ("negative rank in list", change((["experiments", "linear", "rank"], [1, -2])),
     ["experiments.linear.rank[1] must be at least 1", "got -2"]),
    ("zero depth", change((["experiments", "relu", "depths"], [[0, 2]])),
     ["experiments.relu.depths[0][0] must be at least 1"]),
    ("negative learning rate", change((["sweep", "lr"], [-0.1])), ["sweep.lr[0] must be above 0"]),
    ("zero learning rate", change((["experiments", "linear", "methods", "sgd"], {"lr": 0})),
     ["experiments.linear.methods.sgd.lr must be above 0"]),
    ("negative weight decay", change((["sweep", "weight_decay"], [-1])), ["sweep.weight_decay[0] must be at least 0"]),
    ("negative seed", change((["seeds"], [-1])), ["seeds[0] must be at least 0"]),
    ("zero threads", change((["train", "threads"], 0)), ["train.threads must be at least 1"]),
    ("zero batch members", change((["batching"], {"max_members": 0})), ["batching.max_members must be at least 1"]),
    ("learning rate overflows float32", change((["sweep", "lr"], [1e38])),
     ["lr must be at most", "overflows float32", "experiments.linear (method sgd)"]),
    ("pretrained_level of 1", change((["shared", "pretrained_level"], 1)), ["shared.pretrained_level must be above 1"]),
    # Values outside their choices.
    ("unknown method", change((["experiments", "linear", "methods", "adam"], {})),
     ["experiments.linear.methods has the unknown key 'adam'", "ours, sgd, flt"]),
    ("unknown activation", change((["experiments", "relu", "activation"], "tanh")),
     ["experiments.relu.activation must be one of relu, linear", "'tanh'"]),
    ("unknown experiment type", change((["experiments", "linear", "exp"], "cnn")),
     ["experiments.linear.exp must be one of fnn, tfn"]),
    ("use_bias of 2", change((["experiments", "relu", "use_bias"], 2)),
     ["experiments.relu.use_bias must be one of 0, 1"]),
    ("unknown device", change((["train", "device"], "tpu")), ["train.device must be one of auto, cpu, cuda"]),
    ("unknown figure", change((["figures"], ["figure3"])), ["figures[0] must be one of", "'figure3'"]),
    ("experiment name with dash", change((["experiments", "my-exp"], {"exp": "fnn", "methods": {"ours": {}}})),
     ["experiments has the invalid name 'my-exp'", "letters, digits and underscores"]),
    # Duplicates.
    ("duplicate seed", change((["seeds"], [0, 0])), ["seeds lists 0 more than once", "remove the duplicate"]),
    ("duplicate rank", change((["experiments", "linear", "rank"], [1, 2, 2])),
     ["experiments.linear (method", "rank lists a value twice", "remove the duplicate"]),
    ("duplicate learning rate", change((["sweep", "lr"], [0.01, 0.01])), ["sweep.lr lists 0.01 more than once"]),
    ("duplicate depth pair", change((["experiments", "relu", "depths"], [[1, 2], [1, 2]])),
     ["experiments.relu (method", "depths lists a value twice"]),
    ("duplicate figure", change((["figures"], ["figure1", "figure1"])), ["figures lists 'figure1' more than once"]),
    # Settings that contradict each other.
    ("rank above width", change((["experiments", "linear", "rank"], [1, 8])),
     ["experiments.linear (method", "rank must be between 1 and the width (4), got 8",
      "lower the rank or raise width"]),
    ("frozen depth below target depth", change((["experiments", "relu", "depths"], [[2, 1]])),
     ["experiments.relu (method", "frozen_depth (1) must be at least target_depth (2)", "depths sets"]),
    ("last_layers above frozen depth",
     change((["experiments", "final_layers", "methods", "flt"], {"last_layers": [1, 9], "rank": 1})),
     ["experiments.final_layers (method flt)", "last_layers must be between 1 and frozen_depth (8), got 9"]),
    ("transformer with final layers", change((["experiments", "transformer", "methods", "flt"], {})),
     ["experiments.transformer (method flt)", "only defined for exp fnn", "use method sgd or ours"]),
    ("transformer construction with two depths", change((["experiments", "transformer", "depths"], [[1, 2]])),
     ["experiments.transformer (method ours)", "target_depth equal to frozen_depth", "set frozen_depth 1"]),
    ("transformer with uniform init",
     change((["experiments", "transformer", "init_mode"], "uniform_singular_values")),
     ["experiments.transformer (method", "init_mode uniform_singular_values is only defined for exp fnn"]),
    ("construction with rank steps", change((["experiments", "linear", "rank_step"], 1)),
     ["experiments.linear (method ours)", "set rank_step 0"]),
    ("ranks and rank_step together",
     change((["experiments", "relu", "methods", "sgd"], {"ranks": [[1, 1]], "rank_step": 1})),
     ["experiments.relu (method sgd)", "either ranks or rank_step, not both"]),
    ("ranks of wrong length", change((["experiments", "linear", "methods", "sgd"], {"ranks": [[1, 1, 1]]})),
     ["experiments.linear (method sgd)", "ranks lists 3 per-layer ranks but frozen_depth is 2"]),
    # Figures without runs, and bad batching keys.
    ("figure listed without runs", linear_only(figures=["figure1", "tfn_approx"]),
     ["figures lists 'tfn_approx'", "no run of the grid feeds it", "remove it from 'figures'"]),
    ("default figures without runs", linear_only(),
     ["no run of the grid feeds the figure 'figure2'", "list the figures to draw under 'figures'"]),
    ("unknown batching key in batch_over", change((["batching"], {"batch_over": ["rank", "width"]})),
     ["batching.batch_over[1] must be one of", "'width'", "settings in which the runs of one training job"]),
    ("duplicate batching key", change((["batching"], {"batch_over": ["rank", "rank"]})),
     ["batching.batch_over lists 'rank' more than once"]),
]

# Cases that also run through `snakemake -n`, one from each kind of check.
DRY_RUN_CASES = [
    "unknown method key", "width as string", "empty rank list", "negative learning rate", "unknown method",
    "duplicate seed", "rank above width", "transformer with final layers", "figure listed without runs",
]
CONFIGS = {name: config for name, config, _ in CASES}
FRAGMENTS = {name: fragments for name, _, fragments in CASES}


def test_base_config_is_valid():
    runs = check_config(copy.deepcopy(BASE), SCHEMA)

    assert len(runs) > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_check_config_rejects(name):
    with pytest.raises(ConfigError) as caught:
        check_config(CONFIGS[name], SCHEMA)

    message = str(caught.value)
    for fragment in FRAGMENTS[name]:
        assert fragment in message, f"{fragment!r} missing from the message:\n{message}"


def _dry_run(folder: Path, config: dict) -> subprocess.CompletedProcess:
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--configfile", "config.yaml",
               "-n", "--cores", "1"]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """Output of `snakemake -n` per case (and for the valid base), two at a time."""
    root = tmp_path_factory.mktemp("dry_runs")
    jobs = {"valid base": BASE, **{name: CONFIGS[name] for name in DRY_RUN_CASES}}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_dry_run, root / f"case{index}", config)
                   for index, (name, config) in enumerate(jobs.items())}
        completed = {name: future.result() for name, future in futures.items()}
    return root, completed


def test_dry_run_accepts_base(dry_runs):
    _, completed = dry_runs
    result = completed["valid base"]

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Job stats" in result.stdout + result.stderr


@pytest.mark.parametrize("name", DRY_RUN_CASES)
def test_dry_run_rejects(dry_runs, name):
    root, completed = dry_runs
    result = completed[name]
    output = result.stdout + result.stderr
    folder = root / f"case{DRY_RUN_CASES.index(name) + 1}"

    assert result.returncode != 0, output
    assert "Invalid configuration" in output
    for fragment in FRAGMENTS[name]:
        assert fragment in output, f"{fragment!r} missing from the output:\n{output}"
    assert "Job stats" not in output
    assert not (folder / "results").exists()
    assert not (folder / "logs").exists()
