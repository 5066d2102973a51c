"""Choice of the torch device a run or a training job computes on."""

from __future__ import annotations

import torch

from .config import ConfigError


def resolve_device(name: str) -> torch.device:
    """Map `cpu`, `cuda` or `auto` to a torch.device; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was requested but PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}); use device 'auto' or 'cpu', or install a CUDA build of torch"
        )
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device must be one of auto, cpu, cuda, got {name!r}")
    return torch.device(name)
