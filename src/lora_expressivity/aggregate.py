"""Tables from result records: all runs, the best run of each sweep, and each figure's curves.

Selection follows the paper: for a gradient method, each (setting, rank or
last_layers, seed) cell keeps the run with the lowest validation loss over the
learning rate x weight decay sweep and reports that run's test loss. A curve point
is the median of those test losses over seeds; the table also keeps the spread.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd

from .results import SCHEMA_VERSION

log = logging.getLogger(__name__)

SWEEP_KEYS = ("lr", "weight_decay")
# Settings that do not identify a selection cell beyond the sweep.
NON_CELL_KEYS = SWEEP_KEYS + ("device",)


# Fixes appended to the reasons for skipping a file, so that the log and skipped.csv include the fix.
RERUN_FIX = "delete it and rerun snakemake to train this configuration again"
FOREIGN_FIX = "move it out of results/runs, or add its configuration back to the grid"


def load_records(paths, expected_ids: set[str] | None = None) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Read result records into a table with one row per run, and return it with the skipped (path, reason) pairs.

    A file is skipped when it is missing, is not valid JSON (for example a file cut
    short by a full disk), has another schema version, or (with expected_ids) has a
    run id outside the grid. Each skip is logged as a warning with the path.
    """
    rows, skipped = [], []
    for path in map(str, paths):
        try:
            with open(path) as stream:
                record = json.load(stream)
        except FileNotFoundError:
            skipped.append((path, "missing; rerun snakemake to train this configuration"))
            continue
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            detail = error.msg if hasattr(error, "msg") else str(error)
            skipped.append((path, f"not valid JSON ({detail}); {RERUN_FIX}"))
            continue
        if not isinstance(record, dict) or record.get("schema_version") != SCHEMA_VERSION:
            found = record.get("schema_version") if isinstance(record, dict) else None
            skipped.append((path, f"schema version {found!r}, expected {SCHEMA_VERSION}; {RERUN_FIX}"))
            continue
        run_id = Path(path).stem
        if expected_ids is not None and run_id not in expected_ids:
            skipped.append((path, f"its configuration is not in the current grid; {FOREIGN_FIX}"))
            continue
        environment = record.get("environment", {})
        row = {"run_id": run_id, **record["config"], **_flat_metrics(record["metrics"])}
        row["ranks"] = json.dumps(row["ranks"]) if row.get("ranks") is not None else None
        row["git_commit"] = environment.get("git_commit")
        row["git_dirty"] = environment.get("git_dirty")
        row["package_version"] = environment.get("package_version")
        row["config_hash"] = record.get("config_hash")
        rows.append(row)
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    return pd.DataFrame(rows), skipped


def unexpected_files(folder, expected_ids: set[str]) -> list[tuple[str, str]]:
    """List the files in the runs folder that no run of the grid writes, with the reason for each.

    These are result JSONs of configurations outside the grid and temporary files
    that a killed job left behind in the middle of an atomic write.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            found.append((str(path), "temporary file of an interrupted write; delete it"))
        elif path.suffix == ".json" and path.stem not in expected_ids:
            found.append((str(path), f"its configuration is not in the current grid; {FOREIGN_FIX}"))
    for path, reason in found:
        log.warning("skipped %s: %s", path, reason)
    return found


def diverged_mask(table: pd.DataFrame) -> pd.Series:
    """Return a boolean Series that is True for the runs whose loss became NaN or infinite."""
    if "diverged" not in table:
        return pd.Series(False, index=table.index)
    return table["diverged"].astype("boolean").fillna(False).astype(bool)


def _flat_metrics(metrics: dict) -> dict:
    out = {key: value for key, value in metrics.items() if key != "singular_values"}
    for key in ("test_loss", "val_loss", "final_train_loss"):
        if out.get(key) is None:
            out[key] = math.nan
    out["singular_values"] = json.dumps(metrics.get("singular_values") or [])
    return out


def cell_keys(table: pd.DataFrame) -> list[str]:
    skip = set(NON_CELL_KEYS) | {"run_id", "test_loss", "val_loss", "final_train_loss", "singular_values",
                                 "pretraining_stopped_at_epoch", "pretraining_val_loss", "wall_time_s",
                                 "diverged", "git_commit", "git_dirty", "package_version", "config_hash",
                                 "experiments", "path"}
    return [column for column in table.columns if column not in skip]


def best_of_sweep(table: pd.DataFrame) -> pd.DataFrame:
    """Keep one row per cell: the run with the lowest finite validation loss (or the only run, for ours)."""
    if table.empty:
        return table
    diverged = diverged_mask(table)
    usable = table[~diverged]
    for run in table[diverged]["run_id"]:
        log.warning("run %s diverged (non-finite loss); it is left out of the best-of-sweep selection", run)
    keys = cell_keys(table)
    gradient = usable[usable["method"] != "ours"]
    construction = usable[usable["method"] == "ours"]
    if not gradient.empty:
        order = gradient.sort_values(["val_loss", "run_id"])
        gradient = order.groupby(keys, dropna=False, sort=False).head(1)
    return pd.concat([construction, gradient]).sort_values(keys).reset_index(drop=True)


def summarise(selected: pd.DataFrame, by: list[str], value: str = "test_loss") -> pd.DataFrame:
    """Median and spread of value over seeds for each group."""
    grouped = selected.groupby(by, dropna=False)[value]
    summary = grouped.agg(
        median="median",
        q25=lambda s: s.quantile(0.25),
        q75=lambda s: s.quantile(0.75),
        min="min",
        max="max",
        n_seeds="count",
    )
    return summary.reset_index()


def closed_form_loss(singular_values_json: str, rank: int, frozen_depth: int, target_depth: int,
                     width: int) -> float:
    """Optimal MSE of a linear model with Gaussian inputs: sum of sigma_i^2 beyond the kept ones / width."""
    values = json.loads(singular_values_json)
    if target_depth != 1 or len(values) != 1:
        return math.nan
    cut = (frozen_depth // target_depth) * rank
    return sum(sigma ** 2 for sigma in values[0][cut:]) / width
