"""The explicit LoRA construction from the paper's proofs (method `ours`).

The inverses and products follow the reference's order in float32. In deep or
near-threshold settings round-off decides the result, so a different order would
give different numbers there even though it is the same algebra.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


def matrix_step(target: torch.Tensor, frozen: list[torch.Tensor], rank: int, report: list | None = None):
    """Adapters (A_l, B_l) such that prod_l (W_l + A_l B_lᵀ) is the best rank-kR fix of the product.

    frozen lists W_0 ... W_{k-1} in the order they are applied, so the frozen product
    is W_{k-1} ... W_0. The correction is E V_{:, :kR} V_{:, :kR}ᵀ with E = target - product,
    exact when k * rank >= width. The singular values of E are appended to report.
    """
    k = len(frozen)
    width = target.shape[0]
    identity = torch.eye(width, dtype=target.dtype, device=target.device)

    # suffix[l] is the product of the frozen matrices applied after W_l.
    suffix = [identity] * k
    for layer in range(k - 1, 0, -1):
        suffix[layer - 1] = suffix[layer] @ frozen[layer]
    product = suffix[0] @ frozen[0]

    error = target - product
    _, singular_values, V = torch.svd(error)
    if report is not None:
        report.append(singular_values.detach().cpu())
    _warn_if_tied(singular_values, k * rank)

    adapters = []
    running = identity
    for layer in range(k):
        columns = slice(min(rank * layer, width), min(rank * (layer + 1), width))
        A = torch.inverse(suffix[layer]) @ error @ V[:, columns]
        B = (V.T @ torch.inverse(running))[columns, :].T
        running = (frozen[layer] + A @ B.T) @ running
        adapters.append((A, B))

    if rank >= math.ceil(width / k) and (running - target).abs().max().item() > 1e-3:
        discrepancy = ((running - target).abs() / target.abs()).max().item()
        log.warning(
            "the construction misses its target by up to %.4g (relative) although rank %d >= "
            "ceil(width / %d), so round-off in the matrix inverses dominates this run", discrepancy, rank, k,
        )
    return adapters


def _warn_if_tied(singular_values: torch.Tensor, cut: int):
    """Warn when the kept and dropped singular values tie, because the SVD basis then decides."""
    if 0 < cut < len(singular_values):
        kept, dropped = singular_values[cut - 1].item(), singular_values[cut].item()
        if math.isclose(kept, dropped, rel_tol=1e-5, abs_tol=1e-12):
            log.warning(
                "singular values %d and %d of the error matrix are equal (%.6g), so the "
                "construction's result depends on the SVD basis that LAPACK returns",
                cut, cut + 1, kept,
            )


@torch.no_grad()
def construct_fnn(model, target, config, report: list):
    """Write the construction's adapters (and, with biases, biases) into model in place.

    With biases, every layer but the last of a group gets a constant bias large
    enough to keep all ReLUs active on a batch z, so the group acts linearly. The
    last layer's bias then cancels what the earlier biases added.
    """
    dtype = model.layers[0].weight.dtype
    z = torch.randn(config.batch_size, config.width).to(dtype) if config.use_bias else None
    groups = layer_groups(config.target_depth, config.frozen_depth)
    for index, (first, stop) in enumerate(groups):
        frozen_weights = [model.layers[layer].weight for layer in range(first, stop)]
        adapters = matrix_step(target.layers[index].weight, frozen_weights, config.rank, report)
        for layer, (A, B) in zip(range(first, stop), adapters):
            model.adapters[layer].set(A, B)
        if config.use_bias:
            z = _set_group_biases(model, target.layers[index].bias, first, stop, z)


def _set_group_biases(model, target_bias, first: int, stop: int, z: torch.Tensor) -> torch.Tensor:
    width = z.shape[1]
    # after[l] is the product of the adapted weights that follow layer l in the group.
    after = {stop - 1: torch.eye(width, dtype=z.dtype)}
    for layer in range(stop - 1, first, -1):
        after[layer - 1] = after[layer] @ model.adapted_weight(layer)

    correction = torch.zeros(width, dtype=z.dtype)
    for layer in range(first, stop):
        z = z @ model.adapted_weight(layer).T
        if layer < stop - 1:
            bias = -2 * torch.clamp(z.min(), max=0) * torch.ones(width, dtype=z.dtype)
            z = z + bias
            correction = correction + after[layer] @ bias
        else:
            bias = target_bias - correction
        model.layers[layer].bias.copy_(bias)
    return z


def layer_groups(target_depth: int, frozen_depth: int) -> list[tuple[int, int]]:
    """[first, stop) of the frozen layers that match each target layer; the last group takes the rest."""
    q = frozen_depth // target_depth
    groups = [(i * q, (i + 1) * q) for i in range(target_depth)]
    groups[-1] = (groups[-1][0], frozen_depth)
    return groups


@torch.no_grad()
def construct_tfn(model, target, config, report: list):
    """Write the construction's adapters and biases into the transformer model in place."""
    depth = len(model.blocks)
    for b, (block, target_block) in enumerate(zip(model.blocks, target.blocks)):
        if b > 0:
            previous, target_previous = model.blocks[b - 1], target.blocks[b - 1]
            C2 = target_previous.W2.weight @ torch.inverse(previous.W2.weight)
        C1 = torch.inverse(block.W1.weight) @ target_block.W1.weight

        for head in range(config.n_head):
            Wq, Wk, Wv, Wo = block.Wq[head], block.Wk[head], block.Wv[head], block.Wo[head]
            Tq, Tk, Tv, To = (target_block.Wq[head], target_block.Wk[head],
                              target_block.Wv[head], target_block.Wo[head])
            adapters = block.attention_adapters[4 * head: 4 * head + 4]

            qk_target = Tk.T @ Tq if b == 0 else C2.T @ Tk.T @ Tq @ C2
            (Aq, Bq), (Ak, Bk) = matrix_step(qk_target, [Wq, Wk.T], config.rank, report)
            adapters[0].set(Aq, Bq)
            # Wkᵀ + A Bᵀ = (Wk + B Aᵀ)ᵀ, so the key adapter takes the factors swapped.
            adapters[1].set(Bk, Ak)

            vo_target = C1 @ To @ Tv if b == 0 else C1 @ To @ Tv @ C2
            (Av, Bv), (Ao, Bo) = matrix_step(vo_target, [Wv, Wo], config.rank, report)
            adapters[2].set(Av, Bv)
            adapters[3].set(Ao, Bo)

        block.W1.bias.copy_(target_block.W1.bias)
        if b < depth - 1:
            block.W2.bias.copy_(block.W2.weight @ torch.inverse(target_block.W2.weight) @ target_block.W2.bias)
        else:
            last_target = target.output.weight @ target_block.W2.weight
            (A2, B2), (Aout, Bout) = matrix_step(last_target, [block.W2.weight, model.output.weight],
                                                 config.rank, report)
            block.W2_adapter.set(A2, B2)
            model.output_adapter.set(Aout, Bout)
            adapted_output = model.output.weight + Aout @ Bout.T
            block.W2.bias.copy_(torch.inverse(adapted_output) @ target.output.weight @ target_block.W2.bias)
