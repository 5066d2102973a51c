"""Reproduction of the synthetic experiments of Zeng & Lee, "The Expressive Power of Low-Rank Adaptation"."""

from .config import ConfigError, RunConfig
from .experiment import RunResult, run

__version__ = "0.1.0"

__all__ = ["ConfigError", "RunConfig", "RunResult", "run", "__version__"]
