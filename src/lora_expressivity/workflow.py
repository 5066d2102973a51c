"""Helpers the Snakemake scripts share: logging to the rule's log file and provenance."""

from __future__ import annotations

import logging
import sys


def log_to(path: str, level=logging.INFO) -> logging.Logger:
    """Send this process's log records and uncaught errors to the rule's log file."""
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

    def log_uncaught(kind, error, trace):
        root.error("job failed", exc_info=(kind, error, trace))
        sys.__excepthook__(kind, error, trace)

    sys.excepthook = log_uncaught
    return logging.getLogger("lora_expressivity.workflow")


def figure_metadata(config_name: str, grid_hash: str) -> dict:
    """PDF and PNG metadata naming the configuration and the commit a figure comes from."""
    from . import __version__
    from .results import git_state

    commit, dirty = git_state()
    origin = f"config {config_name} (grid {grid_hash}), commit {commit}{' (dirty)' if dirty else ''}"
    return {
        "Subject": origin,
        "Keywords": f"lora-expressivity {__version__}; {origin}",
        "Creator": f"lora-expressivity {__version__}",
        "Description": origin,
        "Software": f"lora-expressivity {__version__}",
    }
