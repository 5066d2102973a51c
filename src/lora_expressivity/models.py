"""The paper's models: a LoRA adapter, the FNN and the transformer (TFN).

Parameters are created in the reference's order, so that one seed gives the same
weights: a model's own layers first, then its adapters. Every forward pass merges
an adapter into its weight as W + A Bᵀ, which is also how the construction writes
adapted weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LoRAAdapter(nn.Module):
    """A rank-r update A Bᵀ of a width x width weight; A starts at zero, so it is inert."""

    def __init__(self, width: int, rank: int, std: float):
        super().__init__()
        # Both randn draws only advance the generator: A is zeroed and B redrawn,
        # exactly as the reference does, so later draws line up with it.
        self.A = nn.Parameter(torch.randn(width, rank))
        self.B = nn.Parameter(torch.randn(width, rank))
        nn.init.zeros_(self.A)
        nn.init.normal_(self.B, mean=0.0, std=std)

    def delta(self) -> torch.Tensor:
        return self.A @ self.B.T

    def set(self, A: torch.Tensor, B: torch.Tensor):
        """Replace the factors; the construction may return fewer columns than the rank."""
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().clone())


def merged(weight: torch.Tensor, adapter: LoRAAdapter | None) -> torch.Tensor:
    return weight if adapter is None else weight + adapter.delta()


class FNN(nn.Module):
    """depth square layers, each followed by the activation (the last one included)."""

    def __init__(self, width: int, depth: int, use_bias: bool, activation: str,
                 ranks: list[int] | None = None, std: float = 0.25):
        super().__init__()
        self.activation = activation
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=bool(use_bias)) for _ in range(depth))
        self.adapters = None
        if ranks is not None:
            self.adapters = nn.ModuleList(LoRAAdapter(width, rank, std) for rank in ranks)

    def adapted_weight(self, layer: int) -> torch.Tensor:
        adapter = None if self.adapters is None else self.adapters[layer]
        return merged(self.layers[layer].weight, adapter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = F.linear(x, self.adapted_weight(index), layer.bias)
            if self.activation == "relu":
                x = F.relu(x)
        return x


class TFNBlock(nn.Module):
    """Multi-head attention without scaling, residual or norm, then a ReLU feed-forward.

    Inputs have shape (batch, width, seq_length): tokens are columns.
    """

    def __init__(self, width: int, n_head: int, rank: int | None, std: float, w2_adapter: bool):
        super().__init__()
        self.n_head = n_head
        self.Wq, self.Wk, self.Wv, self.Wo = (nn.ParameterList() for _ in range(4))
        for _ in range(n_head):
            for weights in (self.Wq, self.Wk, self.Wv, self.Wo):
                weights.append(nn.Parameter(torch.randn(width, width)))
        self.attention_adapters = None
        if rank is not None:
            self.attention_adapters = nn.ModuleList(
                LoRAAdapter(width, rank, std) for _ in range(4 * n_head)
            )
        self.W1 = nn.Linear(width, width)
        self.W2 = nn.Linear(width, width)
        self.W2_adapter = LoRAAdapter(width, rank, std) if w2_adapter else None

    def head_weights(self, head: int) -> list[torch.Tensor]:
        """Adapted [Wq, Wk, Wv, Wo] of one head."""
        own = [self.Wq[head], self.Wk[head], self.Wv[head], self.Wo[head]]
        if self.attention_adapters is None:
            return own
        return [merged(w, self.attention_adapters[4 * head + i]) for i, w in enumerate(own)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The order of operations matches the reference: keys, queries, then values,
        # Wo applied after the attention, token-wise layers on the transposed input
        # and the W2 adapter added separately. Transformer runs are sensitive to
        # float32 round-off, and this order reproduces the reference's numbers. The
        # creation order matters too: at depth 2, autograd sums the gradients of
        # the second block's input in the reverse order of the products that use it.
        out = 0
        for head in range(self.n_head):
            Wq, Wk, Wv, Wo = self.head_weights(head)
            keys = Wk @ x
            queries = Wq @ x
            values = Wv @ x
            attention = torch.softmax(keys.transpose(1, 2) @ queries, dim=1)
            out = out + Wo @ (values @ attention)
        tokens = out.transpose(1, 2)
        hidden = F.relu(self.W1(tokens))
        tokens = self.W2(hidden)
        if self.W2_adapter is not None:
            tokens = tokens + F.linear(hidden, self.W2_adapter.delta())
        return tokens.transpose(1, 2)


class TFN(nn.Module):
    """depth blocks and a bias-free output layer; adapters when rank is given."""

    def __init__(self, width: int, depth: int, n_head: int, rank: int | None = None, std: float = 0.25):
        super().__init__()
        self.blocks = nn.ModuleList(
            TFNBlock(width, n_head, rank, std, w2_adapter=rank is not None and b == depth - 1)
            for b in range(depth)
        )
        self.output = nn.Linear(width, width, bias=False)
        self.output_adapter = LoRAAdapter(width, rank, std) if rank is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        tokens = x.transpose(1, 2)
        out = self.output(tokens)
        if self.output_adapter is not None:
            out = out + F.linear(tokens, self.output_adapter.delta())
        return out.transpose(1, 2)


def build_models(config) -> tuple[nn.Module, nn.Module]:
    """Build the target model, then the frozen model with adapters, drawing in that order."""
    if config.exp == "fnn":
        target = FNN(config.width, config.target_depth, config.use_bias, config.activation)
        frozen = FNN(config.width, config.frozen_depth, config.use_bias, config.activation,
                     ranks=config.layer_ranks(), std=config.std)
    else:
        target = TFN(config.width, config.target_depth, config.n_head)
        frozen = TFN(config.width, config.target_depth, config.n_head, rank=config.rank, std=config.std)
    return target, frozen
