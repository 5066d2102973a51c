"""Expansion of the workflow's YAML grid into runs with stable ids, grouped into training batches.

A grid has `shared` settings, `seeds`, a learning rate x weight decay `sweep` for the
gradient methods, and named `experiments`. In an experiment and in each of its
`methods`, a scalar fixes a setting and a list crosses it with the others.
`depths` lists [target_depth, frozen_depth] pairs. `ours` runs once per cell, so
the sweep does not apply to it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field

from .config import ConfigError, RunConfig

GRADIENT_METHODS = ("sgd", "flt")
LIST_VALUED = ("depths", "ranks")
# Settings that may differ between the members of one training batch by default.
# method is among them so that ours and gradient runs of one setting share its pretraining.
DEFAULT_BATCH_OVER = ("method", "rank", "lr", "weight_decay", "tune_bias", "last_layers", "rank_step", "ranks")


@dataclass(frozen=True)
class Run:
    run_id: str
    config: RunConfig
    experiments: tuple[str, ...]

    @property
    def path(self) -> str:
        return f"results/runs/{self.run_id}.json"


@dataclass
class Batch:
    batch_id: str
    runs: list[Run] = field(default_factory=list)

    @property
    def outputs(self) -> list[str]:
        return [run.path for run in self.runs]


def run_id(config: RunConfig) -> str:
    return f"{config.exp}-{config.method}-{config.config_hash()}"


def expand_grid(grid: dict) -> list[Run]:
    """Expand the grid into its runs, deduplicated across experiments, in a stable order.

    Raises ConfigError naming the experiment, the method and the setting at fault.
    """
    shared = dict(grid.get("shared", {}))
    seeds = grid.get("seeds", [shared.pop("seed", 0)])
    sweep = grid.get("sweep", {})
    experiments = grid.get("experiments", {})
    if not experiments:
        raise ConfigError("the grid has no experiments; add at least one under 'experiments'")

    runs: dict[str, Run] = {}
    for name, experiment in experiments.items():
        experiment = dict(experiment)
        methods = experiment.pop("methods", None)
        if not methods:
            raise ConfigError(f"experiments.{name} has no methods; add e.g. 'methods: {{ours: {{}}}}'")
        depths = experiment.pop("depths", None)
        for method, method_settings in methods.items():
            axes = {**shared, **experiment, **(method_settings or {}), "method": method, "seed": seeds}
            if depths is not None:
                axes["depths"] = [tuple(pair) for pair in depths]
            if method in GRADIENT_METHODS:
                for key in ("lr", "weight_decay"):
                    if key in sweep and key not in (method_settings or {}):
                        axes[key] = sweep[key]
            for config in _cross(axes, where=f"experiments.{name} (method {method})"):
                identifier = run_id(config)
                previous = runs.get(identifier)
                names = (previous.experiments if previous else ()) + (name,)
                runs[identifier] = Run(identifier, config, tuple(dict.fromkeys(names)))
    return list(runs.values())


def _cross(axes: dict, where: str):
    keys = list(axes)
    values = []
    for key, value in axes.items():
        if key in LIST_VALUED:
            # Each value of these settings is itself a list, so the axis is a list of lists.
            if not isinstance(value, list) or not all(isinstance(item, (list, tuple)) for item in value):
                raise ConfigError(f"{where}: {key} must be a list of lists, e.g. [[1, 2], [2, 4]], got {value!r}")
            values.append(value)
        else:
            values.append(value if isinstance(value, list) else [value])
    for key, options in zip(keys, values):
        if not options:
            raise ConfigError(f"{where}: {key} is an empty list; give at least one value")
        if len(set(map(_hashable, options))) != len(options):
            raise ConfigError(f"{where}: {key} lists a value twice ({options}); remove the duplicate")
    for combination in itertools.product(*values):
        settings = dict(zip(keys, combination))
        if "depths" in settings:
            pair = settings.pop("depths")
            if len(pair) != 2:
                raise ConfigError(f"{where}: depths must hold [target_depth, frozen_depth] pairs, got {list(pair)}")
            settings["target_depth"], settings["frozen_depth"] = pair
        if settings.get("ranks") is not None:
            settings["ranks"] = tuple(settings["ranks"])
        try:
            yield RunConfig.from_dict(settings)
        except ConfigError as error:
            shown = {k: v for k, v in settings.items() if k in ("exp", "method", "rank", "target_depth",
                                                                   "frozen_depth", "last_layers", "rank_step")}
            # The run checks name settings as command line flags, but the grid sets them as YAML keys.
            message = re.sub(r"--(\w+)", r"\1", str(error))
            if "depths" in axes and "_depth" in message:
                message += "; depths sets [target_depth, frozen_depth]"
            raise ConfigError(f"{where}: {message} (in the run {shown})") from None
        except TypeError as error:
            raise ConfigError(f"{where}: {error}") from None


def _hashable(value):
    return json.dumps(value, sort_keys=True)


def make_batches(runs: list[Run], batch_over=DEFAULT_BATCH_OVER, max_members: int = 256) -> list[Batch]:
    """Group runs that differ only in batch_over settings, in chunks of at most max_members.

    Batch ids hash the shared settings, so a batch keeps its id when a rank or a sweep
    value is added. Its outputs change, and Snakemake reruns just that batch.
    """
    groups: dict[str, list[Run]] = {}
    for run in runs:
        key = {k: v for k, v in run.config.to_dict().items() if k not in batch_over}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        groups.setdefault(digest, []).append(run)
    named = {}
    for digest, members in groups.items():
        methods = sorted({run.config.method for run in members})
        # A batch of one method carries the method in its id, so rule names show what a job trains.
        prefix = "-".join([members[0].config.exp, *methods]) if len(methods) == 1 else members[0].config.exp
        named[f"{prefix}-{digest}"] = members
    groups = named
    batches = []
    for key, members in sorted(groups.items()):
        members.sort(key=lambda run: run.run_id)
        chunks = [members[i:i + max_members] for i in range(0, len(members), max_members)]
        for index, chunk in enumerate(chunks):
            batch_id = key if len(chunks) == 1 else f"{key}-{index}"
            batches.append(Batch(batch_id, chunk))
    return batches


def runs_table(runs: list[Run]):
    """Build a DataFrame with one row per run: id, experiments, path and every setting."""
    import pandas as pd

    rows = []
    for run in runs:
        row = {"run_id": run.run_id, "experiments": ",".join(run.experiments), "path": run.path}
        row.update(run.config.to_dict())
        rows.append(row)
    return pd.DataFrame(rows)
