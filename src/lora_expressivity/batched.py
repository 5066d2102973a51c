"""Training loop, loss and optimizer for members stacked along a leading axis.

The pieces reproduce training.train for every member at once: one input batch per
distinct seed and step, drawn from that seed's own generator, the target's outputs
computed once per seed, one forward and backward for all members, and an Adam step
that equals torch.optim.Adam member by member with per-member learning rate and
weight decay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BETA1 = 0.9
BETA2 = 0.999
EPS = 1e-8


class MemberMSE(torch.autograd.Function):
    """Per-member mean squared error over all but the leading axis.

    The forward takes the mean of (output - target)² as F.mse_loss does, and the
    backward computes (2 / n) * (output - target) * grad like mse_loss_backward, so
    that each member's gradient is rounded as in a single run.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        difference = output - target
        ctx.save_for_backward(difference)
        return (difference * difference).flatten(1).mean(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (difference,) = ctx.saved_tensors
        norm = 2.0 / difference[0].numel()
        shape = (-1,) + (1,) * (difference.dim() - 1)
        return difference * norm * grad.reshape(shape), None


def member_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Losses [K] of K members, differentiable with respect to output."""
    return MemberMSE.apply(output, target)


class StackedAdam:
    """torch.optim.Adam (L2 weight decay, bias corrections) over tensors of shape [K, ...].

    lrs and weight_decays hold one value per member. Members with equal weight decay
    must be adjacent: the decay is added slice by slice with Tensor.add(alpha=...),
    the call torch.optim.Adam makes, because a per-member tensor factor would round
    differently. masks[i], where given, has shape [K, 1, ...] and zeroes the gradient
    (after weight decay) of members that do not train params[i]; their moments then
    stay zero and the update is exactly zero.
    """

    def __init__(self, params: list[torch.Tensor], lrs: list[float], weight_decays: list[float],
                 masks: list[torch.Tensor | None] | None = None):
        members = len(lrs)
        if len(weight_decays) != members:
            raise ValueError(f"got {members} learning rates but {len(weight_decays)} weight decays")
        for param in params:
            if param.shape[0] != members:
                raise ValueError(f"parameter of shape {tuple(param.shape)} does not have {members} members")
        self.params = params
        self.masks = masks if masks is not None else [None] * len(params)
        self.decay_slices = _runs_of_equal_values(weight_decays)
        seen = [value for _, _, value in self.decay_slices]
        if len(seen) != len(set(seen)):
            raise ValueError("members with equal weight decay must be adjacent; sort them by weight decay")
        device = params[0].device if params else "cpu"
        self.lrs = torch.tensor(lrs, dtype=torch.float64)
        self.neg_step_sizes = torch.empty(members, dtype=torch.float32, device=device)
        self.exp_avgs = [torch.zeros_like(param) for param in params]
        self.exp_avg_sqs = [torch.zeros_like(param) for param in params]
        self.step_count = 0

    def zero_grad(self):
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self):
        self.step_count += 1
        # The same double-precision scalars as torch.optim.Adam's single-tensor path.
        bias_correction1 = 1 - BETA1 ** float(self.step_count)
        bias_correction2 = 1 - BETA2 ** float(self.step_count)
        bias_correction2_sqrt = bias_correction2 ** 0.5
        # lr / bias_correction1 in double, rounded to float32 once, as the scalar
        # value of Tensor.addcdiv_ is.
        self.neg_step_sizes.copy_((self.lrs / bias_correction1).neg())

        for param, exp_avg, exp_avg_sq, mask in zip(self.params, self.exp_avgs, self.exp_avg_sqs, self.masks):
            grad = param.grad
            if grad is None:
                continue
            for start, stop, weight_decay in self.decay_slices:
                if weight_decay != 0:
                    grad[start:stop].add_(param[start:stop], alpha=weight_decay)
            if mask is not None:
                grad.mul_(mask)
            exp_avg.lerp_(grad, 1 - BETA1)
            exp_avg_sq.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(EPS)
            # param + (-step_size * exp_avg) / denom, the order Tensor.addcdiv_ evaluates.
            step_sizes = self.neg_step_sizes.view((-1,) + (1,) * (param.dim() - 1))
            update = exp_avg * step_sizes
            update.div_(denom)
            param.add_(update)


def _runs_of_equal_values(values: list[float]) -> list[tuple[int, int, float]]:
    """(start, stop, value) for each maximal run of equal adjacent values."""
    runs = []
    start = 0
    for index in range(1, len(values) + 1):
        if index == len(values) or values[index] != values[start]:
            runs.append((start, index, values[start]))
            start = index
    return runs


class SeedStreams:
    """Input batches and target outputs per distinct seed, handed out per member.

    Each seed has its own torch.Generator, seeded like torch.manual_seed(seed), so a
    seed's stream equals the global stream of a single run with that seed. Inputs are
    drawn on the CPU and then moved to the device, as in a single run.

    sample(generator, n) draws n inputs; to_rows(tensor) turns a batch of inputs or
    target outputs into the layout of the stacked model.
    """

    def __init__(self, member_seeds: list[int], targets: dict[int, torch.nn.Module], device,
                 sample: Callable[[torch.Generator, int], torch.Tensor],
                 to_rows: Callable[[torch.Tensor], torch.Tensor]):
        self.seeds = sorted(set(member_seeds))
        position = {seed: index for index, seed in enumerate(self.seeds)}
        self.member_seed = torch.tensor([position[seed] for seed in member_seeds], device=device)
        self.targets = targets
        self.device = device
        self.sample = sample
        self.to_rows = to_rows
        self.generators = {}
        self.restart()

    def restart(self):
        """Reseed every stream, like torch.manual_seed(seed) in a single run."""
        self.generators = {seed: torch.Generator().manual_seed(seed) for seed in self.seeds}

    @torch.no_grad()
    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and target outputs [seeds, rows, width], one entry per distinct seed."""
        inputs, outputs = [], []
        for seed in self.seeds:
            x = self.sample(self.generators[seed], n).to(self.device)
            outputs.append(self.to_rows(self.targets[seed](x)))
            inputs.append(self.to_rows(x))
        return torch.stack(inputs), torch.stack(outputs)

    def for_members(self, per_seed: torch.Tensor, members: slice = slice(None)) -> torch.Tensor:
        """Expand a per-seed tensor to the selected members."""
        index = self.member_seed[members]
        if per_seed.shape[0] == 1:
            return per_seed.expand((index.shape[0],) + per_seed.shape[1:])
        return per_seed.index_select(0, index)


def train_members(forward: Callable[[torch.Tensor], torch.Tensor], optimizer: StackedAdam,
                  streams: SeedStreams, n_epochs: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run n_epochs Adam steps, then the validation batch; returns (final train losses, validation losses).

    The losses are tensors [K] and stay on the device; nothing is copied to Python
    during the loop.
    """
    step_sizes = optimizer.neg_step_sizes
    losses = torch.full(step_sizes.shape, float("nan"), device=step_sizes.device)
    for _ in range(n_epochs):
        inputs, outputs = streams.draw(batch_size)
        losses = member_mse(forward(streams.for_members(inputs)), streams.for_members(outputs))
        optimizer.zero_grad()
        losses.sum().backward()
        optimizer.step()
    with torch.no_grad():
        inputs, outputs = streams.draw(batch_size)
        val_losses = member_mse(forward(streams.for_members(inputs)), streams.for_members(outputs))
    return losses.detach(), val_losses


@torch.no_grad()
def evaluate_members(forward: Callable[[torch.Tensor, slice], torch.Tensor], streams: SeedStreams,
                     n: int, members: int, chunk: int) -> torch.Tensor:
    """Losses [K] on one draw of n inputs per seed, computing chunk members at a time."""
    inputs, outputs = streams.draw(n)
    losses = []
    for start in range(0, members, chunk):
        selected = slice(start, min(start + chunk, members))
        prediction = forward(streams.for_members(inputs, selected), selected)
        losses.append(member_mse(prediction, streams.for_members(outputs, selected)))
    return torch.cat(losses)
