"""FNNs and transformers of K members stacked along a leading member axis.

Every parameter of member k sits at index k of a tensor of shape [K, ...], and one
torch.bmm per layer computes all members at once. The operations mirror the forward
passes in models.py one for one (the same products with the same inner dimension, the
bias added in the same place, the heads summed in the same order), because the
matrix kernels then round each member exactly as a single run does. On the 2-core CPU
of the project's test machine (PyTorch 2.13, MKL) a batched member reproduces run()
bit for bit; tests/test_engine.py checks this.

Adapters of different ranks share one tensor: the factors A and B are zero-padded to
the largest rank of the batch. A padded column contributes exactly zero to A Bᵀ, and
its gradient (G B for A, Gᵀ A for B, both zero there) stays zero, so padding changes
no member's result.

The transformer works on token rows: a batch of inputs of shape (batch, width,
seq_length) becomes a matrix of batch * seq_length rows of width features, member by
member, so that every projection is one bmm over [K, batch * seq_length, width].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import FNN, TFN, LoRAAdapter


def stack_tensors(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """Stack detached copies of per-member tensors along a new leading axis."""
    return torch.stack([tensor.detach() for tensor in tensors]).to(device)


def stack_adapters(adapters: list[LoRAAdapter], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the factors of one adapter per member, zero-padded to the largest rank."""
    width = adapters[0].A.shape[0]
    rank = max(adapter.A.shape[1] for adapter in adapters)
    A = torch.zeros(len(adapters), width, rank)
    B = torch.zeros(len(adapters), width, rank)
    for member, adapter in enumerate(adapters):
        A[member, :, : adapter.A.shape[1]] = adapter.A.detach()
        B[member, :, : adapter.B.shape[1]] = adapter.B.detach()
    return A.to(device), B.to(device)


def adapter_delta(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A Bᵀ for every member, as LoRAAdapter.delta computes it."""
    return torch.bmm(A, B.transpose(-2, -1))


class StackedFNN:
    """K FNNs of equal width, depth, bias and activation; adapters are optional.

    weights[l] has shape [K, width, width] (out x in), biases[l] [K, 1, width],
    A[l] and B[l] [K, width, rank_l] with rank_l the largest rank of layer l.
    """

    def __init__(self, models: list[FNN], with_adapters: bool, device):
        first = models[0]
        self.members = len(models)
        self.depth = len(first.layers)
        self.activation = first.activation
        self.weights = [stack_tensors([m.layers[layer].weight for m in models], device)
                        for layer in range(self.depth)]
        self.biases: list[torch.Tensor | None] = [None] * self.depth
        if first.layers[0].bias is not None:
            self.biases = [stack_tensors([m.layers[layer].bias for m in models], device).unsqueeze(1)
                           for layer in range(self.depth)]
        self.A: list[torch.Tensor] = []
        self.B: list[torch.Tensor] = []
        if with_adapters:
            for layer in range(self.depth):
                A, B = stack_adapters([m.adapters[layer] for m in models], device)
                self.A.append(A)
                self.B.append(B)

    def forward(self, x: torch.Tensor, members: slice = slice(None)) -> torch.Tensor:
        """Outputs [k, n, width] of the selected members for inputs [k, n, width]."""
        for layer in range(self.depth):
            weight = self.weights[layer][members]
            # A layer whose largest rank is 0 has A Bᵀ = 0, and W + 0 = W.
            if self.A and self.A[layer].shape[2] > 0:
                weight = weight + adapter_delta(self.A[layer][members], self.B[layer][members])
            bias = self.biases[layer]
            if bias is None:
                x = torch.bmm(x, weight.transpose(1, 2))
            else:
                x = torch.baddbmm(bias[members], x, weight.transpose(1, 2))
            if self.activation == "relu":
                x = F.relu(x)
        return x


class StackedTFN:
    """K transformers of equal width, depth, heads and sequence length, with adapters.

    Per block: attention [K, 4H, width, width] holding (Wq, Wk, Wv, Wo) of head 0, then
    of head 1, and so on, which is also the order of the attention adapters; W1 and W2
    weights [K, width, width] and biases [K, 1, width]; in the last block the W2
    adapter. After the blocks: the output weight and the output adapter.
    """

    def __init__(self, models: list[TFN], device):
        first = models[0]
        self.members = len(models)
        self.n_head = first.blocks[0].n_head
        self.blocks = []
        for index, block in enumerate(first.blocks):
            blocks = [m.blocks[index] for m in models]
            attention = [
                torch.stack([w for head in range(self.n_head)
                             for w in (b.Wq[head], b.Wk[head], b.Wv[head], b.Wo[head])])
                for b in blocks
            ]
            stacked = {
                "attention": stack_tensors(attention, device),
                "W1": stack_tensors([b.W1.weight for b in blocks], device),
                "b1": stack_tensors([b.W1.bias for b in blocks], device).unsqueeze(1),
                "W2": stack_tensors([b.W2.weight for b in blocks], device),
                "b2": stack_tensors([b.W2.bias for b in blocks], device).unsqueeze(1),
                "attention_A": None,
                "attention_B": None,
                "W2_A": None,
                "W2_B": None,
            }
            if block.attention_adapters is not None:
                factors = [stack_adapters([b.attention_adapters[i] for b in blocks], device)
                           for i in range(4 * self.n_head)]
                stacked["attention_A"] = torch.stack([A for A, _ in factors], 1)
                stacked["attention_B"] = torch.stack([B for _, B in factors], 1)
            if block.W2_adapter is not None:
                stacked["W2_A"], stacked["W2_B"] = stack_adapters([b.W2_adapter for b in blocks], device)
            self.blocks.append(stacked)
        self.output = stack_tensors([m.output.weight for m in models], device)
        self.output_A = self.output_B = None
        if first.output_adapter is not None:
            self.output_A, self.output_B = stack_adapters([m.output_adapter for m in models], device)

    def forward(self, rows: torch.Tensor, seq_length: int, members: slice = slice(None)) -> torch.Tensor:
        """Output token rows [k, n * seq_length, width] of the selected members."""
        for block in self.blocks:
            rows = self._block(block, rows, seq_length, members)
        out = torch.bmm(rows, self.output[members].transpose(1, 2))
        if self.output_A is not None:
            delta = adapter_delta(self.output_A[members], self.output_B[members])
            out = out + torch.bmm(rows, delta.transpose(1, 2))
        return out

    def _block(self, block: dict, rows: torch.Tensor, seq_length: int, members: slice) -> torch.Tensor:
        members_count, row_count, width = rows.shape
        heads = self.n_head
        weights = block["attention"][members]
        if block["attention_A"] is not None:
            A = block["attention_A"][members].flatten(0, 1)
            B = block["attention_B"][members].flatten(0, 1)
            weights = weights + adapter_delta(A, B).view(weights.shape)

        # Queries, keys and values of every head come from one bmm against the
        # transposed weights side by side; each output is still a dot product of
        # length width, so the values equal three separate products.
        projection = weights.view(members_count, heads, 4, width, width)[:, :, :3]
        projection = projection.permute(0, 4, 1, 2, 3).reshape(members_count, width, heads * 3 * width)
        qkv = torch.bmm(rows, projection)
        parts = qkv.view(-1, seq_length, heads * 3, width).unbind(2)

        out = None
        for head in range(heads):
            queries, keys, values = parts[3 * head: 3 * head + 3]
            # scores[i, j] = key i . query j, and the softmax runs over the keys
            # (dim 1), as in TFNBlock.forward.
            scores = torch.bmm(keys, queries.transpose(1, 2))
            attention = torch.softmax(scores, dim=1)
            mixed = torch.bmm(attention.transpose(1, 2), values).view(members_count, row_count, width)
            head_out = torch.bmm(mixed, weights[:, 4 * head + 3].transpose(1, 2))
            out = head_out if out is None else out + head_out

        hidden = F.relu(torch.bmm(out, block["W1"][members].transpose(1, 2)) + block["b1"][members])
        tokens = torch.baddbmm(block["b2"][members], hidden, block["W2"][members].transpose(1, 2))
        if block["W2_A"] is not None:
            delta = adapter_delta(block["W2_A"][members], block["W2_B"][members])
            tokens = tokens + torch.bmm(hidden, delta.transpose(1, 2))
        return tokens
