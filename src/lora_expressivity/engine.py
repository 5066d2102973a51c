"""Training many configurations in one process."""

from __future__ import annotations

from .config import RunConfig
from .experiment import RunResult, run


def run_batch(configs: list[RunConfig], device: str | None = None) -> list[RunResult]:
    """Run every configuration and return their results in the same order."""
    # TODO: stack the members of a batch into one model; this loop is the fallback.
    results = []
    for config in configs:
        if device is not None:
            config = RunConfig(**{**config.to_dict(), "device": device})
        results.append(run(config))
    return results
