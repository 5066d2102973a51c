"""Settings of one run: the reference command line's flags, their defaults and checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields

EXPERIMENTS = ("fnn", "tfn")
METHODS = ("ours", "sgd", "flt")
ACTIVATIONS = ("relu", "linear")
INIT_MODES = ("default", "uniform_singular_values")
DEVICES = ("cpu", "cuda", "auto")
# Settings that the hash compares as floats, so that 3 and 3.0 give one run id.
FLOAT_SETTINGS = ("std", "lr", "weight_decay", "pretrained_lr", "pretrained_level")
# Adam's first step is lr / (1 - beta1) = 10 * lr with torch's default beta1 of 0.9,
# and torch (2.13) raises an overflow error when that step exceeds the float32 maximum.
MAX_LEARNING_RATE = 3.4028234663852886e38 / 10


class ConfigError(ValueError):
    """An invalid setting, raised before any work starts."""


@dataclass(frozen=True)
class RunConfig:
    """One run, with the reference's flags in their order and with their defaults.

    `ranks` (an explicit per-layer rank list) and `device` go beyond the reference.
    """

    width: int = 4
    target_depth: int = 1
    frozen_depth: int = 2
    rank: int = 2
    use_bias: int = 1
    activation: str = "relu"
    std: float = 0.25
    method: str = "ours"
    batch_size: int = 5000
    n_epochs: int = 1000
    lr: float = 0.001
    n_test: int = 10000
    weight_decay: float = 0
    init_mode: str = "default"
    pretrained: int = 0
    pretrained_epochs: int = 1000
    pretrained_lr: float = 0.001
    pretrained_level: float = 3
    tune_bias: int = 1
    last_layers: int = 1
    seed: int = 123
    rank_step: int = 0
    n_head: int = 2
    seq_length: int = 10
    exp: str = "fnn"
    ranks: tuple[int, ...] | None = field(default=None)
    device: str = "cpu"

    def __post_init__(self):
        if self.ranks is not None and not isinstance(self.ranks, tuple):
            object.__setattr__(self, "ranks", tuple(self.ranks))

    # ------------------------------------------------------------------ derived

    @property
    def depth(self) -> int:
        """Depth of the model that carries the adapters (TFN uses target_depth for both)."""
        return self.frozen_depth if self.exp == "fnn" else self.target_depth

    def layer_ranks(self) -> list[int]:
        """Per-layer adapter ranks of an FNN.

        A positive rank_step grows the rank by that much per layer, capped at the width.
        A negative one shrinks it, floored at zero. The reference grew ranks for negative
        steps too (it subtracted the step); this is the documented difference.
        """
        if self.ranks is not None:
            return list(self.ranks)
        if self.rank_step >= 0:
            return [min(self.rank + self.rank_step * layer, self.width) for layer in range(self.frozen_depth)]
        return [max(self.rank + self.rank_step * layer, 0) for layer in range(self.frozen_depth)]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if out["ranks"] is not None:
            out["ranks"] = list(out["ranks"])
        return out

    def config_hash(self) -> str:
        """Stable 16-hex-digit hash of every setting except the device.

        The device is left out so that a result computed on a GPU can stand in for
        the same run on a CPU.
        """
        settings = self.to_dict()
        settings.pop("device")
        for name in FLOAT_SETTINGS:
            settings[name] = float(settings[name])
        canonical = json.dumps(settings, sort_keys=True, default=float)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown setting {unknown[0]!r}; valid settings are: {', '.join(sorted(known))}"
            )
        config = cls(**values)
        config.validate()
        return config

    # ------------------------------------------------------------------ checks

    def validate(self) -> "RunConfig":
        """Raise ConfigError naming the first invalid setting and how to fix it."""
        for name in ("width", "target_depth", "frozen_depth", "batch_size", "n_epochs", "n_test",
                     "n_head", "seq_length", "pretrained_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
        for name in ("use_bias", "pretrained", "tune_bias"):
            if getattr(self, name) not in (0, 1):
                raise ConfigError(f"--{name} takes 0 or 1, got {getattr(self, name)!r}")
        for name in ("lr", "pretrained_lr", "std"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value <= 0:
                raise ConfigError(f"--{name} must be a positive number, got {value!r}")
        for name in ("lr", "pretrained_lr"):
            if getattr(self, name) > MAX_LEARNING_RATE:
                raise ConfigError(
                    f"--{name} must be at most {MAX_LEARNING_RATE:.4g}, because Adam's first step of "
                    f"10 * {name} overflows float32 above it; got {getattr(self, name)!r}"
                )
        if not _is_finite_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"--weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not _is_finite_number(self.pretrained_level) or self.pretrained_level <= 1:
            raise ConfigError(
                f"--pretrained_level must be above 1 (pretraining stops at initial loss / level), "
                f"got {self.pretrained_level!r}"
            )
        _check_choice("exp", self.exp, EXPERIMENTS)
        _check_choice("method", self.method, METHODS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("init_mode", self.init_mode, INIT_MODES)
        _check_choice("device", self.device, DEVICES)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= self.width:
            raise ConfigError(
                f"--rank must be between 1 and the width ({self.width}), got {self.rank!r}; "
                f"lower the rank or raise --width"
            )
        if not isinstance(self.rank_step, int) or isinstance(self.rank_step, bool):
            raise ConfigError(f"--rank_step must be an integer, got {self.rank_step!r}")
        if self.exp == "fnn":
            self._validate_fnn()
        else:
            self._validate_tfn()
        return self

    def _validate_fnn(self):
        if self.frozen_depth < self.target_depth:
            raise ConfigError(
                f"--frozen_depth ({self.frozen_depth}) must be at least --target_depth "
                f"({self.target_depth}); the frozen model must be at least as deep as the target"
            )
        if not 1 <= self.last_layers <= self.frozen_depth:
            raise ConfigError(
                f"--last_layers must be between 1 and --frozen_depth ({self.frozen_depth}), "
                f"got {self.last_layers!r}"
            )
        if self.ranks is not None:
            if len(self.ranks) != self.frozen_depth:
                raise ConfigError(
                    f"ranks lists {len(self.ranks)} per-layer ranks but --frozen_depth is "
                    f"{self.frozen_depth}; give one rank per frozen layer"
                )
            for value in self.ranks:
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.width:
                    raise ConfigError(
                        f"ranks must hold integers between 0 and the width ({self.width}), got {value!r}"
                    )
            if self.rank_step != 0:
                raise ConfigError("give either ranks or --rank_step, not both; set --rank_step 0")
        if self.method == "ours" and (self.rank_step != 0 or self.ranks is not None):
            raise ConfigError(
                "--method ours uses one rank for every layer; set --rank_step 0 and drop ranks, "
                "or use --method sgd"
            )

    def _validate_tfn(self):
        if self.method == "flt":
            raise ConfigError("--method flt is only defined for --exp fnn; use --method sgd or ours")
        if self.init_mode != "default":
            raise ConfigError(
                f"--init_mode {self.init_mode} is only defined for --exp fnn; use --init_mode default"
            )
        if self.method == "ours" and self.target_depth != self.frozen_depth:
            raise ConfigError(
                f"--exp tfn --method ours needs --target_depth equal to --frozen_depth "
                f"(got {self.target_depth} and {self.frozen_depth}); the transformer uses one depth "
                f"for the target and the frozen model, so set --frozen_depth {self.target_depth}"
            )
        if self.rank_step != 0 or self.ranks is not None:
            raise ConfigError("per-layer ranks are only defined for --exp fnn; set --rank_step 0")


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_choice(name: str, value, choices):
    if value not in choices:
        raise ConfigError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
