"""Result records on disk: one JSON per run, written atomically, with provenance."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SCHEMA_VERSION = 1


def _finite_or_none(value):
    """Replace NaN and infinity, which JSON lacks, by null; the record's `diverged` flag marks such runs."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def atomic_write_text(path: str | os.PathLike, text: str):
    """Write text to path through a temporary file and a rename, so no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def result_record(result, config_hash: str | None = None, threads: int | None = None) -> dict:
    """The JSON record of one run: schema version, configuration, metrics and environment."""
    metrics = result.to_dict()
    config = metrics.pop("config")
    record = {
        "schema_version": SCHEMA_VERSION,
        "config_hash": config_hash,
        "config": config,
        "metrics": metrics,
        "environment": environment(threads),
    }
    return _finite_or_none(record)


def write_result(path, result, config_hash: str | None = None, threads: int | None = None):
    if config_hash is None:
        from .config import RunConfig
        config_hash = RunConfig(**result.config).config_hash()
    record = result_record(result, config_hash, threads)
    atomic_write_text(path, json.dumps(record, indent=1, allow_nan=False) + "\n")


def environment(threads: int | None = None) -> dict:
    from . import __version__
    commit, dirty = git_state()
    return {
        "package_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": threads if threads is not None else torch.get_num_threads(),
        "host": platform.node(),
    }


@lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """Commit of the repository this package lives in, and whether its tree has changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status.strip())


def read_record(path) -> dict:
    with open(path) as stream:
        return json.load(stream)
