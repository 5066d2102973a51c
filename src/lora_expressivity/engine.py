"""Training many configurations in one process, as one batched model per group.

run_batch splits the configurations into groups that can train together (same model
shape, method, batch size, number of steps and test size) and trains each group as
one stacked model (see stacked.py and batched.py). Every member is built and, where
asked, pretrained by the single-run code, so its initial weights are those of run().
Members with the same seed share one input stream and one set of target outputs.
`ours` runs have no training and go through run() one by one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from .batched import SeedStreams, StackedAdam, evaluate_members, train_members
from .config import RunConfig
from .devices import resolve_device
from .experiment import RunResult, make_uniform_singular_values, run
from .models import build_models
from .stacked import StackedFNN, StackedTFN
from .training import pretrain

log = logging.getLogger(__name__)

# Settings that members of one training group share. The rest (rank, rank_step,
# ranks, std, lr, weight_decay, tune_bias, last_layers, pretrained and the pretraining
# settings, seed) may differ between members.
GROUP_FIELDS = ("exp", "method", "width", "target_depth", "frozen_depth", "use_bias", "activation",
                "init_mode", "batch_size", "n_epochs", "n_test", "n_head", "seq_length")

# Settings that decide the pretrained weights of an FNN. The rank is absent: the FNN's
# layers are drawn before its adapters, pretraining reseeds, and A = 0 makes the
# adapters inert, so the rank changes nothing. The TFN draws W1 and W2 of a block after
# that block's attention adapters, so its key adds the rank.
PRETRAINING_FIELDS = ("exp", "width", "target_depth", "frozen_depth", "use_bias", "activation", "std",
                      "batch_size", "init_mode", "pretrained_epochs", "pretrained_lr", "pretrained_level",
                      "seed", "n_head", "seq_length")

# Memory for one training group's activations and optimizer state. Together with the
# interpreter and torch (about 300 MB) this keeps a training job under 2 GB.
TRAINING_MEMORY_BYTES = 1 << 30
EVALUATION_MEMORY_BYTES = 512 << 20


def run_batch(configs: list[RunConfig], device: str | None = None, *,
              max_members: int | None = None) -> list[RunResult]:
    """Run every configuration and return their results in the same order.

    device, when given, replaces each configuration's device (`auto` picks CUDA when
    available). max_members caps the members trained as one stacked model; by default
    the cap follows from TRAINING_MEMORY_BYTES.
    """
    if device is not None:
        configs = [replace(config, device=device) for config in configs]
    for config in configs:
        config.validate()
    if max_members is not None and max_members < 1:
        raise ValueError(f"max_members must be a positive integer, got {max_members!r}")

    results: list[RunResult | None] = [None] * len(configs)
    groups: dict[tuple, list[int]] = {}
    for index, config in enumerate(configs):
        if config.method == "ours":
            results[index] = run(config)
        else:
            key = tuple(getattr(config, name) for name in GROUP_FIELDS) + (str(resolve_device(config.device)),)
            groups.setdefault(key, []).append(index)

    pretraining = PretrainingCache()
    for indices in groups.values():
        # StackedAdam needs members with equal weight decay side by side.
        indices = sorted(indices, key=lambda index: configs[index].weight_decay)
        limit = max_members or member_limit(configs[indices[0]])
        for start in range(0, len(indices), limit):
            chunk = indices[start:start + limit]
            for index, result in zip(chunk, train_group([configs[i] for i in chunk], pretraining)):
                results[index] = result
    return results


def member_limit(config: RunConfig) -> int:
    """Largest number of members whose training fits TRAINING_MEMORY_BYTES (an estimate)."""
    return max(1, TRAINING_MEMORY_BYTES // training_bytes_per_member(config))


def training_bytes_per_member(config: RunConfig) -> int:
    """Estimated memory of one member's forward and backward pass, in bytes.

    Counts float32 tensors of batch x width (x seq_length) that autograd keeps per
    layer, with a margin for the temporaries of the backward pass. The factors were
    fitted to peak memory measured on CPU (see docs/benchmarks.md).
    """
    if config.exp == "fnn":
        per_layer = 8 * config.batch_size * config.width
        return 4 * per_layer * (config.frozen_depth + config.target_depth)
    rows = config.batch_size * config.seq_length
    per_block = rows * (12 * config.n_head * config.width + 2 * config.n_head * config.seq_length + 8 * config.width)
    return 4 * per_block * (config.target_depth + 1)


def evaluation_chunk(config: RunConfig) -> int:
    """Number of members whose test-set forward pass fits EVALUATION_MEMORY_BYTES."""
    rows = config.n_test * (config.seq_length if config.exp == "tfn" else 1)
    per_member = 4 * rows * config.width * (16 if config.exp == "tfn" else 4)
    return max(1, EVALUATION_MEMORY_BYTES // per_member)


@dataclass
class Member:
    """A member's models as run() would have them right before its gradient method."""

    target: torch.nn.Module
    frozen: torch.nn.Module
    pretraining_stopped_at_epoch: int | None = None
    pretraining_val_loss: float | None = None


@dataclass
class PretrainingEntry:
    initial: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    pretrained: dict[str, torch.Tensor]
    stopped_at: int
    val_loss: float


class PretrainingCache:
    """Pretrained frozen weights per (setting, seed), computed once by training.pretrain.

    A hit is checked: the member's frozen weights before pretraining and its target must
    equal those of the member that was pretrained, otherwise RuntimeError.
    """

    def __init__(self):
        self.entries: dict[tuple, PretrainingEntry] = {}

    @staticmethod
    def key(config: RunConfig) -> tuple:
        key = tuple(getattr(config, name) for name in PRETRAINING_FIELDS)
        return key + ((config.rank,) if config.exp == "tfn" else ())

    def apply(self, config: RunConfig, member: Member, device):
        """Replace the member's frozen non-adapter weights by their pretrained values."""
        key = self.key(config)
        initial = _frozen_weights(member.frozen)
        target = _clone_state(member.target)
        entry = self.entries.get(key)
        if entry is None:
            pretrained, stopped_at, val_loss = pretrain(member.frozen, member.target, config, device,
                                                        echo=lambda line: None)
            entry = PretrainingEntry(initial=_clone(initial), target=target,
                                     pretrained=_clone(_frozen_weights(pretrained)),
                                     stopped_at=stopped_at, val_loss=val_loss)
            self.entries[key] = entry
        elif not (_equal(entry.initial, initial) and _equal(entry.target, target)):
            raise RuntimeError(
                f"internal error: pretraining key {key} matched a member whose frozen or target "
                f"weights differ; PRETRAINING_FIELDS misses a setting that changes them"
            )
        with torch.no_grad():
            for name, tensor in initial.items():
                tensor.copy_(entry.pretrained[name])
        member.pretraining_stopped_at_epoch = entry.stopped_at
        member.pretraining_val_loss = entry.val_loss


def _frozen_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if "adapter" not in name}


def _clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


def _clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return _clone(dict(model.named_parameters()))


def _equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def prepare_member(config: RunConfig, device, pretraining: PretrainingCache) -> Member:
    """Build the member's target and frozen model in run()'s order of random draws."""
    torch.manual_seed(config.seed)
    target, frozen = build_models(config)
    if config.init_mode == "uniform_singular_values":
        make_uniform_singular_values(target, frozen, config)
    member = Member(target=target.to(device), frozen=frozen.to(device))
    if config.pretrained:
        pretraining.apply(config, member, device)
    return member


def shared_targets(configs: list[RunConfig], members: list[Member]) -> dict[int, torch.nn.Module]:
    """One target model per seed; raise RuntimeError if members of one seed disagree."""
    targets: dict[int, torch.nn.Module] = {}
    states: dict[int, dict[str, torch.Tensor]] = {}
    for config, member in zip(configs, members):
        state = dict(member.target.named_parameters())
        if config.seed not in targets:
            targets[config.seed] = member.target
            states[config.seed] = state
        elif not _equal(states[config.seed], state):
            raise RuntimeError(
                f"internal error: two members with seed {config.seed} in one training group have "
                f"different targets; GROUP_FIELDS misses a setting that changes the target"
            )
    return targets


def train_group(configs: list[RunConfig], pretraining: PretrainingCache) -> list[RunResult]:
    """Train configurations that agree on GROUP_FIELDS as one stacked model."""
    started = time.perf_counter()
    first = configs[0]
    device = resolve_device(first.device)
    log.info("training %d %s %s members on %s", len(configs), first.exp, first.method, device)

    members = [prepare_member(config, device, pretraining) for config in configs]
    targets = shared_targets(configs, members)
    if first.exp == "fnn":
        model = StackedFNN([m.frozen for m in members], with_adapters=first.method == "sgd", device=device)
        params, masks = fnn_trainables(model, configs, device)
        width = first.width

        def sample(generator, n):
            return torch.randn(n, width, generator=generator)

        def to_rows(tensor):
            return tensor

        forward = model.forward
    else:
        model = StackedTFN([m.frozen for m in members], device=device)
        params, masks = tfn_trainables(model), None
        width, seq_length = first.width, first.seq_length

        def sample(generator, n):
            return torch.randn(n, width, seq_length, generator=generator)

        def to_rows(tensor):
            return tensor.transpose(1, 2).reshape(-1, width)

        def forward(rows, members=slice(None)):
            return model.forward(rows, seq_length, members)

    for param in params:
        param.requires_grad_(True)
    optimizer = StackedAdam(params, [c.lr for c in configs], [c.weight_decay for c in configs], masks)
    streams = SeedStreams([c.seed for c in configs], targets, device, sample, to_rows)
    final_losses, val_losses = train_members(forward, optimizer, streams, first.n_epochs, first.batch_size)
    for param in params:
        param.requires_grad_(False)

    # The FNN evaluation reseeds; the TFN test set continues each seed's stream.
    if first.exp == "fnn":
        streams.restart()
    test_losses = evaluate_members(forward, streams, first.n_test, len(configs), evaluation_chunk(first))

    share = (time.perf_counter() - started) / len(configs)
    log.info("trained %d members in %.1f s", len(configs), share * len(configs))
    return [
        RunResult(
            config=config.to_dict(),
            test_loss=test,
            val_loss=val,
            final_train_loss=final,
            pretraining_stopped_at_epoch=member.pretraining_stopped_at_epoch,
            pretraining_val_loss=member.pretraining_val_loss,
            wall_time_s=share,
            device=str(device),
        )
        for config, member, test, val, final in zip(
            configs, members, test_losses.tolist(), val_losses.tolist(), final_losses.tolist()
        )
    ]


def fnn_trainables(model: StackedFNN, configs: list[RunConfig], device) -> tuple[list, list]:
    """Tensors the method updates, with a per-member mask where members differ."""
    members = len(configs)
    params, masks = [], []

    def mask_of(flags: Iterable[bool]):
        flags = list(flags)
        if all(flags):
            return None
        return torch.tensor(flags, dtype=torch.float32, device=device).view(members, 1, 1)

    if configs[0].method == "sgd":
        for A, B in zip(model.A, model.B):
            if A.shape[2] > 0:
                params += [A, B]
                masks += [None, None]
        tune_bias = [bool(config.tune_bias) for config in configs]
        if model.biases[0] is not None and any(tune_bias):
            for bias in model.biases:
                params.append(bias)
                masks.append(mask_of(tune_bias))
        return params, masks

    depth = model.depth
    deepest = max(config.last_layers for config in configs)
    for layer in range(depth - deepest, depth):
        mask = mask_of(layer >= depth - config.last_layers for config in configs)
        params.append(model.weights[layer])
        masks.append(mask)
        # Without biases final layers tuning tunes the weights alone, as in training.py.
        if model.biases[layer] is not None:
            params.append(model.biases[layer])
            masks.append(mask)
    return params, masks


def tfn_trainables(model: StackedTFN) -> list[torch.Tensor]:
    """Every adapter factor: attention adapters of all blocks, the W2 and output adapters."""
    params = []
    for block in model.blocks:
        for name in ("attention_A", "attention_B", "W2_A", "W2_B"):
            if block[name] is not None:
                params.append(block[name])
    if model.output_A is not None:
        params += [model.output_A, model.output_B]
    return params

