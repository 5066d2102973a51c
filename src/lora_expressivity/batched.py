"""Training loop, loss and optimizer for members stacked along a leading axis.

The pieces reproduce training.train for every member at once. Each step draws one
input batch per distinct seed from that seed's own generator and computes the
target's outputs once per seed. One forward and backward pass serves all members,
and the Adam step equals torch.optim.Adam member by member, with a learning rate and
weight decay per member.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BETA1 = 0.9
BETA2 = 0.999
EPS = 1e-8
# Floor for the second moment before its square root: sqrt(1e-36) divided by the
# smallest bias correction, sqrt(1 - BETA2) at step 1, is 3.2e-17, below half an ulp
# of EPS in float32 (4.4e-16).
SQRT_FLOOR = 1e-36


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
    """Compute the losses [K] of K members, differentiable with respect to output."""
    return MemberMSE.apply(output, target)


class StackedAdam:
    """torch.optim.Adam (L2 weight decay, bias corrections) over tensors of shape [K, ...].

    lrs and weight_decays hold one value per member. The weight decay is added to each
    run of adjacent members with equal decay by Tensor.add(alpha=...), the call
    torch.optim.Adam makes, because a per-member tensor factor would round differently;
    sorting the members by weight decay keeps the runs few. masks[i], where given,
    contains a 1 or 0 per member (K values in any shape). It zeroes the gradient
    (after weight decay) of members that do not train params[i], so their moments stay
    zero and their update is exactly zero.

    The optimizer keeps its state in [K, P] buffers that hold every parameter of a
    member side by side, so that one step is about ten tensor operations whatever the
    number of parameters. step() gathers the gradients into such a buffer and copies
    the updated values back into the parameters.
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
        self.decay_slices = [run for run in _runs_of_equal_values(weight_decays) if run[2] != 0]

        device = params[0].device if params else "cpu"
        with torch.no_grad():
            self.flat_params = torch.cat([param.detach().flatten(1) for param in params]
                                         or [torch.empty(members, 0)], dim=1)
        self.param_views = list(torch.split(self.flat_params, [p[0].numel() for p in params], dim=1))
        self.flat_mask = None
        if masks is not None and any(mask is not None for mask in masks):
            self.flat_mask = torch.cat([
                (mask if mask is not None else torch.ones(members, device=device)).reshape(members, 1)
                .expand(members, param[0].numel())
                for param, mask in zip(params, masks)
            ], dim=1)
        self.exp_avg = torch.zeros_like(self.flat_params)
        self.exp_avg_sq = torch.zeros_like(self.flat_params)
        self.lrs = torch.tensor(lrs, dtype=torch.float64)
        self.neg_step_sizes = torch.empty(members, 1, dtype=torch.float32, device=device)
        self.step_count = 0

    @torch.no_grad()
    def step(self, gradients: list[torch.Tensor]):
        """Update every parameter from its gradient; gradients are left unchanged."""
        self.step_count += 1
        if not self.params:
            return
        # The same double-precision scalars as torch.optim.Adam's single-tensor path.
        bias_correction1 = 1 - BETA1 ** float(self.step_count)
        bias_correction2 = 1 - BETA2 ** float(self.step_count)
        bias_correction2_sqrt = bias_correction2 ** 0.5
        # lr / bias_correction1 in double, rounded to float32 once, as the scalar
        # value of Tensor.addcdiv_ is.
        self.neg_step_sizes.copy_((self.lrs / bias_correction1).neg().view(-1, 1))

        grad = torch.cat([gradient.reshape(gradient.shape[0], -1) for gradient in gradients], dim=1)
        param = self.flat_params
        for start, stop, weight_decay in self.decay_slices:
            grad[start:stop].add_(param[start:stop], alpha=weight_decay)
        if self.flat_mask is not None:
            grad.mul_(self.flat_mask)
        self.exp_avg.lerp_(grad, 1 - BETA1)
        self.exp_avg_sq.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        # PyTorch's CPU sqrt is several times slower on zeros and subnormal numbers, and
        # zeros are common here (padded adapter columns, untrained members). For any
        # v <= SQRT_FLOOR, sqrt(v) / bias_correction2_sqrt is below half an ulp of EPS,
        # so the denominator rounds to EPS with or without the floor: the result is
        # bit for bit that of torch.optim.Adam.
        denom = (self.exp_avg_sq.clamp_min(SQRT_FLOOR).sqrt_() / bias_correction2_sqrt).add_(EPS)
        # param + (-step_size * exp_avg) / denom, the order Tensor.addcdiv_ evaluates.
        update = self.exp_avg * self.neg_step_sizes
        update.div_(denom)
        param.add_(update)
        torch._foreach_copy_(self.params, [view.view_as(p) for view, p in zip(self.param_views, self.params)])


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
        """Draw inputs and compute target outputs [seeds, rows, width], one entry per distinct seed."""
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


def train_members(model, optimizer: StackedAdam, streams: SeedStreams, n_epochs: int,
                  batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run n_epochs Adam steps, then the validation batch; returns (final train losses, validation losses).

    model provides loss_and_gradients(inputs, targets, with_losses) for the optimizer's
    tensors and forward(inputs). Only the last step computes its losses, which are the
    final train losses. The losses are tensors [K] on the device; nothing is copied to
    Python during the loop.
    """
    losses = torch.full((len(optimizer.lrs),), float("nan"), device=optimizer.flat_params.device)
    for step in range(n_epochs):
        inputs, outputs = streams.draw(batch_size)
        step_losses, gradients = model.loss_and_gradients(
            streams.for_members(inputs), streams.for_members(outputs), with_losses=step == n_epochs - 1
        )
        if step_losses is not None:
            losses = step_losses
        optimizer.step(gradients)
    with torch.no_grad():
        inputs, outputs = streams.draw(batch_size)
        val_losses = member_mse(model.forward(streams.for_members(inputs)), streams.for_members(outputs))
    return losses, val_losses


@torch.no_grad()
def evaluate_members(forward: Callable[[torch.Tensor, slice], torch.Tensor], streams: SeedStreams,
                     n: int, members: int, chunk: int) -> torch.Tensor:
    """Compute the losses [K] on one draw of n inputs per seed, chunk members at a time."""
    inputs, outputs = streams.draw(n)
    losses = []
    for start in range(0, members, chunk):
        selected = slice(start, min(start + chunk, members))
        prediction = forward(streams.for_members(inputs, selected), selected)
        losses.append(member_mse(prediction, streams.for_members(outputs, selected)))
    return torch.cat(losses)
