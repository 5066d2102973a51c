"""One run from seed to test loss, in the reference's order of random draws."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from .config import RunConfig
from .construction import construct_fnn, construct_tfn, layer_groups
from .devices import resolve_device
from .models import build_models
from .training import evaluate, pretrain, sample_inputs, train, tuned_parameters


@dataclass
class RunResult:
    """Metrics of one run; losses are None where the method has none, NaN where it diverged."""

    config: dict
    test_loss: float
    val_loss: float | None = None
    final_train_loss: float | None = None
    singular_values: list[list[float]] = field(default_factory=list)
    pretraining_stopped_at_epoch: int | None = None
    pretraining_val_loss: float | None = None
    wall_time_s: float = 0.0
    device: str = "cpu"

    @property
    def diverged(self) -> bool:
        losses = (self.test_loss, self.val_loss, self.final_train_loss)
        return any(value is not None and not math.isfinite(value) for value in losses)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["diverged"] = self.diverged
        return out


class _EchoedList(list):
    """Singular values of each matrix step, printed as the reference prints them."""

    def __init__(self, echo):
        super().__init__()
        self.echo = echo

    def append(self, values):
        self.echo(f"Singular values: {values}")
        super().append(values)


def make_uniform_singular_values(target, frozen, config):
    """Move each target layer so that its error matrix E has all singular values equal."""
    with torch.no_grad():
        for index, (first, stop) in enumerate(layer_groups(config.target_depth, config.frozen_depth)):
            product = frozen.layers[first].weight
            for layer in range(first + 1, stop):
                product = frozen.layers[layer].weight @ product
            error = target.layers[index].weight - product
            mean = torch.svd(error)[1].mean()
            target.layers[index].weight.copy_(product + mean * torch.eye(config.width))


def run(config: RunConfig, echo=lambda message: None, pretrain_frozen=pretrain) -> RunResult:
    """Run one configuration; echo receives the reference's console lines.

    pretrain_frozen replaces training.pretrain, for callers that reuse the pretraining
    of an identical setting. It must leave the global generator as pretrain would.
    """
    config.validate()
    device = resolve_device(config.device)
    started = time.perf_counter()
    result = {}

    torch.manual_seed(config.seed)
    target, frozen = build_models(config)
    if config.init_mode == "uniform_singular_values":
        make_uniform_singular_values(target, frozen, config)
    target.to(device)
    frozen.to(device)

    if config.pretrained:
        frozen, result["pretraining_stopped_at_epoch"], result["pretraining_val_loss"] = pretrain_frozen(
            frozen, target, config, device, echo
        )

    singular_values = _EchoedList(echo)
    if config.method == "ours":
        model = _construct(frozen, target, config, singular_values, device)
    else:
        torch.manual_seed(config.seed)
        model = copy.deepcopy(frozen)
        params = tuned_parameters(model, config)
        # The reference reseeds again before the FNN loop only. Nothing is drawn
        # in between, so both models start the loop from the same generator state.
        torch.manual_seed(config.seed)
        outcome = train(model, target, params, config, config.lr, config.weight_decay, device)
        result["val_loss"] = outcome.val_loss
        result["final_train_loss"] = outcome.final_train_loss
        echo(f"Validation loss: {outcome.val_loss:.4f}")

    # The FNN evaluation reseeds, so its test set starts with the first training
    # batch. The TFN evaluation continues the stream from where the method left it.
    if config.exp == "fnn":
        torch.manual_seed(config.seed)
    test_loss = evaluate(model, target, sample_inputs(config, config.n_test).to(device))
    echo(f"Test loss: {test_loss:.4f}")

    return RunResult(
        config=config.to_dict(),
        test_loss=test_loss,
        singular_values=[values.tolist() for values in singular_values],
        wall_time_s=time.perf_counter() - started,
        device=str(device),
        **result,
    )


def _construct(frozen, target, config, singular_values, device):
    if config.exp == "fnn":
        torch.manual_seed(config.seed)
        model = copy.deepcopy(frozen).cpu()
        construct_fnn(model, target.cpu(), config, singular_values)
    else:
        # The TFN construction draws nothing after this seed, so its test set
        # starts right after it.
        torch.manual_seed(config.seed)
        model = copy.deepcopy(frozen).cpu()
        construct_tfn(model, target.cpu(), config, singular_values)
    target.to(device)
    return model.to(device)
