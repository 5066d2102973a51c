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
from contextlib import contextmanager
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

# Activation memory that sets the default number of members per stacked model
# (member_limit).
# A stacked FNN step is limited by memory traffic, so its frozen_depth activations
# [K, batch_size, width] should stay near the caches. At batch 256 and width 16 the
# cap gives K = 96, 48 and 24 for 2, 4 and 8 layers. On the 2-core machine of
# docs/benchmarks.md, 48 members trained a 4-layer cell of 192 runs 20 to 30% faster
# than 12 or 192, and 24 members trained an 8-layer cell about 10% faster than 48.
# A TFN step is dominated by many small matrix products, and a larger K spreads the
# per-seed cost of drawing the batch and running the target over more members. 8 MiB
# of token rows [K, batch_size * seq_length, width] gives K = 51 at batch 256, width 16
# and seq_length 10.
# Both caps also keep the memory of training to a few hundred MB.
FNN_ACTIVATION_BYTES = 3 << 20
TFN_ACTIVATION_BYTES = 8 << 20
# Memory for the test-set forward pass, which runs a chunk of members at a time.
EVALUATION_MEMORY_BYTES = 512 << 20


def run_batch(configs: list[RunConfig], device: str | None = None, *,
              max_members: int | None = None) -> list[RunResult]:
    """Run every configuration and return their results in the same order.

    device, when given, replaces each configuration's device (`auto` picks CUDA when
    available). Gradient runs train in groups of up to max_members members (default:
    member_limit of the group); `ours` runs go through run() one by one. wall_time_s
    of a trained member is an equal share of its stacked model's time, setup and
    evaluation included.

    NOTE: the CUDA path has not been run; no GPU was available while it was written.
    Compare a short batch on the GPU with the same batch on the CPU before a long one.
    """
    if device is not None:
        configs = [replace(config, device=device) for config in configs]
    for config in configs:
        config.validate()
        resolve_device(config.device)
    if max_members is not None and (isinstance(max_members, bool) or not isinstance(max_members, int)
                                    or max_members < 1):
        raise ValueError(f"max_members must be a positive integer, got {max_members!r}")

    results: list[RunResult | None] = [None] * len(configs)
    groups: dict[tuple, list[int]] = {}
    pretraining = PretrainingCache()
    for index, config in enumerate(configs):
        if config.method == "ours":
            results[index] = run(config, pretrain_frozen=pretraining.pretrain_frozen)
        else:
            key = tuple(getattr(config, name) for name in GROUP_FIELDS) + (str(resolve_device(config.device)),)
            if config.exp == "tfn":
                # StackedTFN rounds a member as run() does only without zero padding.
                key += (config.rank,)
            groups.setdefault(key, []).append(index)

    for indices in groups.values():
        # Members of similar rank share a stacked model, so that little of it is
        # zero padding; equal weight decays side by side save StackedAdam slices.
        indices = sorted(indices, key=lambda index: (largest_rank(configs[index]), configs[index].weight_decay))
        limit = max_members or member_limit(configs[indices[0]])
        for start in range(0, len(indices), limit):
            chunk = indices[start:start + limit]
            for index, result in zip(chunk, train_group([configs[i] for i in chunk], pretraining)):
                results[index] = result
    return results


def largest_rank(config: RunConfig) -> int:
    """Largest adapter rank of a run (FNN layers may differ, the TFN has one rank)."""
    return max(config.layer_ranks(), default=0) if config.exp == "fnn" else config.rank


def member_limit(config: RunConfig) -> int:
    """Default number of members per stacked model, from the activation caps above."""
    if config.exp == "fnn":
        return max(1, FNN_ACTIVATION_BYTES // (4 * config.batch_size * config.width * config.frozen_depth))
    return max(1, TFN_ACTIVATION_BYTES // (4 * config.batch_size * config.seq_length * config.width))


def evaluation_chunk(config: RunConfig) -> int:
    """Number of members whose test-set forward pass fits EVALUATION_MEMORY_BYTES (an estimate).

    Counts the float32 tensors of n_test x width (x seq_length) that are alive at once:
    about 4 for an FNN and 16 for a TFN (projections, scores, attention weights).
    """
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
    # Global generator state right after pretraining. A cache hit restores it, so that
    # it leaves the generator as training.pretrain would (run() relies on that).
    rng_state: torch.Tensor


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
                                     stopped_at=stopped_at, val_loss=val_loss, rng_state=torch.get_rng_state())
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
        torch.set_rng_state(entry.rng_state)

    def pretrain_frozen(self, frozen, target, config: RunConfig, device, echo=None):
        """Pretrain frozen in place through the cache; the signature of training.pretrain for run()."""
        member = Member(target=target, frozen=frozen)
        self.apply(config, member, device)
        return member.frozen, member.pretraining_stopped_at_epoch, member.pretraining_val_loss


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
    """Map each seed to one target model; raise RuntimeError if members of one seed disagree."""
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


@contextmanager
def flushed_subnormals(enabled: bool):
    """Flush subnormal float32 results to zero on this thread while the block runs.

    Saturated attention makes subnormal weights and gradients, and x86 CPUs compute
    with those many times more slowly. A transformer step of 12 members took 40 ms
    instead of 31 ms. A subnormal is below 1.2e-38, so it changes no sum of normal
    magnitude. On the test machine the transformer members, trained with flushing,
    still matched unflushed single runs bit for bit (tests/test_engine.py), and the
    faster ClampedSoftmax keeps torch.softmax's bits only while flushing is on. PyTorch
    offers no way to read the flag, so the block ends with flushing off, the default.
    """
    if not enabled:
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def train_group(configs: list[RunConfig], pretraining: PretrainingCache) -> list[RunResult]:
    """Train configurations that agree on GROUP_FIELDS as one stacked model."""
    started = time.perf_counter()
    first = configs[0]
    device = resolve_device(first.device)
    log.info("training %d %s %s members on %s", len(configs), first.exp, first.method, device)

    members = [prepare_member(config, device, pretraining) for config in configs]
    targets = shared_targets(configs, members)
    width = first.width
    if first.exp == "fnn":
        model = StackedFNN([m.frozen for m in members], device, with_adapters=first.method == "sgd")
        masks = configure_fnn_training(model, configs, device)

        def sample(generator, n):
            return torch.randn(n, width, generator=generator)

        def to_rows(tensor):
            return tensor
    else:
        seq_length = first.seq_length
        model = StackedTFN([m.frozen for m in members], seq_length, device)
        masks = None

        def sample(generator, n):
            return torch.randn(n, width, seq_length, generator=generator)

        def to_rows(tensor):
            return tensor.transpose(1, 2).reshape(-1, width)

    params = [tensor for _, _, tensor in model.trained()]
    optimizer = StackedAdam(params, [c.lr for c in configs], [c.weight_decay for c in configs], masks)
    streams = SeedStreams([c.seed for c in configs], targets, device, sample, to_rows)
    with flushed_subnormals(first.exp == "tfn" and device.type == "cpu"):
        if first.exp == "tfn" and not model.choose_softmax():
            log.info("attention uses torch.softmax: the faster clamped softmax needs a CPU, one thread "
                     "and flushed subnormals to give the same results (here %d threads on %s)",
                     torch.get_num_threads(), device)
        final_losses, val_losses = train_members(model, optimizer, streams, first.n_epochs, first.batch_size)

        # The FNN evaluation reseeds, and the TFN test set continues each seed's stream.
        if first.exp == "fnn":
            streams.restart()
        test_losses = evaluate_members(model.forward, streams, first.n_test, len(configs),
                                       evaluation_chunk(first))

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


def configure_fnn_training(model: StackedFNN, configs: list[RunConfig], device) -> list[torch.Tensor | None]:
    """Set which tensors the method trains; returns a mask per trained tensor (None: all members).

    sgd trains every adapter, and the biases of members with tune_bias = 1. flt trains
    the weights and biases of each member's last_layers layers; without biases it
    trains the weights alone, as training.tuned_parameters does.
    """
    members = len(configs)
    if configs[0].method == "sgd":
        model.train_adapters = True
        model.train_biases = any(config.tune_bias for config in configs)
    else:
        model.first_trained_weight = model.depth - max(config.last_layers for config in configs)

    masks = []
    for kind, layer, _ in model.trained():
        if kind in ("A", "B"):
            flags = [True] * members
        elif configs[0].method == "sgd":
            flags = [bool(config.tune_bias) for config in configs]
        else:
            flags = [layer >= model.depth - config.last_layers for config in configs]
        if all(flags):
            masks.append(None)
        else:
            masks.append(torch.tensor(flags, dtype=torch.float32, device=device).view(members, 1, 1))
    return masks
