"""FNNs and transformers of K members stacked along a leading member axis.

Every parameter of member k sits at index k of a tensor of shape [K, ...], and one
torch.bmm per layer computes all members at once.

StackedFNN mirrors the single-run FNN product for product: the same operands, the
same inner dimension, the bias added where F.linear adds it. Its hand-written backward
pass mirrors autograd's in the same way. The matrix kernels then round each member as
a single run does. On the project's test machine (2-core CPU, PyTorch 2.13 with MKL)
its members match run() exactly or to about 1e-7 relative, and tests/test_engine.py
checks 1e-4. StackedTFN does the same for the transformer with autograd and two
custom backward functions, and its members match run() bit for bit.

Adapters of different ranks share one tensor: the factors A and B are zero-padded to
the largest rank of the batch. A padded column contributes exactly zero to A Bᵀ, and
its gradient (G B for A, Gᵀ A for B, both zero there) stays zero, so padding changes
no member's function. The engine still gives each transformer rank its own stacked
model, because the kernels round a padded product differently (see StackedTFN).

The transformer works on token rows. A batch of inputs of shape (batch, width,
seq_length) becomes, for each member, a matrix of batch * seq_length rows of width
features, so that every projection is one bmm over [K, batch * seq_length, width].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batched import member_mse
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
    """Compute A Bᵀ for every member, as LoRAAdapter.delta does."""
    return torch.bmm(A, B.transpose(-2, -1))


class StackedFNN:
    """K FNNs of equal width, depth, bias and activation, with a hand-written backward pass.

    weights[l] has shape [K, width, width] (out x in), biases[l] [K, 1, width],
    A[l] and B[l] [K, width, rank_l] with rank_l the largest rank of layer l.

    train_adapters, train_biases and first_trained_weight choose the trained tensors.
    Final layers tuning trains the weights and biases of every layer from
    first_trained_weight on. trained() lists the tensors in the order of the gradients
    that loss_and_gradients returns.
    """

    def __init__(self, models: list[FNN], device, with_adapters: bool = True):
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
        self.train_adapters = False
        self.train_biases = False
        self.first_trained_weight = self.depth
        self._buffer_shape = None
        self._buffer_store: dict = {}

    def trained(self) -> list[tuple[str, int, torch.Tensor]]:
        """(kind, layer, tensor) of every trained tensor; kind is A, B, weight or bias."""
        out = []
        for layer in range(self.depth):
            if self.train_adapters and self.A and self.A[layer].shape[2] > 0:
                out += [("A", layer, self.A[layer]), ("B", layer, self.B[layer])]
            if layer >= self.first_trained_weight:
                out.append(("weight", layer, self.weights[layer]))
            if self.biases[layer] is not None and (self.train_biases or layer >= self.first_trained_weight):
                out.append(("bias", layer, self.biases[layer]))
        return out

    def merged_weight(self, layer: int, members: slice = slice(None)) -> torch.Tensor:
        """Compute W + A Bᵀ of one layer, [k, out, in], as FNN.adapted_weight does."""
        weight = self.weights[layer][members]
        # A layer whose largest rank is 0 has A Bᵀ = 0, and W + 0 = W.
        if self.A and self.A[layer].shape[2] > 0:
            weight = weight + adapter_delta(self.A[layer][members], self.B[layer][members])
        return weight

    def _layer(self, layer: int, x: torch.Tensor, weight: torch.Tensor, members: slice) -> torch.Tensor:
        bias = self.biases[layer]
        if bias is None:
            x = torch.bmm(x, weight.transpose(1, 2))
        else:
            x = torch.baddbmm(bias[members], x, weight.transpose(1, 2))
        if self.activation == "relu":
            x = x.relu_()
        return x

    def forward(self, x: torch.Tensor, members: slice = slice(None)) -> torch.Tensor:
        """Compute the outputs [k, n, width] of the selected members for inputs [k, n, width]."""
        for layer in range(self.depth):
            x = self._layer(layer, x, self.merged_weight(layer, members), members)
        return x

    def loss_and_gradients(self, x: torch.Tensor, target: torch.Tensor,
                           with_losses: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Compute the per-member MSE losses [K] (None unless with_losses) and the trained() gradients.

        Each product has the operands and layout of the matching autograd step of a
        single run (F.linear's addmm, its backward, the mm of W + A Bᵀ), so a member's
        gradient is rounded as there. Activations and gradients live in buffers that
        are reused from call to call, so the returned gradients are valid only until
        the next call.
        """
        buffers = self._buffers(x)
        merged = [self.merged_weight(layer) for layer in range(self.depth)]
        activations = [x] + buffers["activations"]
        for layer in range(self.depth):
            weight_t = merged[layer].transpose(1, 2)
            out = activations[layer + 1]
            if self.biases[layer] is None:
                torch.bmm(activations[layer], weight_t, out=out)
            else:
                torch.baddbmm(self.biases[layer], activations[layer], weight_t, out=out)
            if self.activation == "relu":
                out.relu_()
        difference = torch.sub(activations[-1], target, out=buffers["difference"])
        losses = (difference * difference).flatten(1).mean(1) if with_losses else None
        grad = difference.mul_(2.0 / difference[0].numel())

        trained = self.trained()
        # With nothing to train (every rank 0, biases fixed) the loop below is empty.
        lowest = min((layer for _, layer, _ in trained), default=self.depth)
        gradients: dict[tuple[str, int], torch.Tensor] = {}
        spare = buffers["input_grads"]
        for layer in range(self.depth - 1, lowest - 1, -1):
            if self.activation == "relu":
                torch.ops.aten.threshold_backward.grad_input(grad, activations[layer + 1], 0, grad_input=grad)
            if self.biases[layer] is not None:
                gradients["bias", layer] = torch.sum(grad, 1, keepdim=True, out=buffers["bias_grads"][layer])
            # (dL/dW)ᵀ = xᵀ G, as the addmm backward of F.linear computes it.
            weight_grad_t = torch.bmm(activations[layer].transpose(1, 2), grad, out=buffers["weight_grads"][layer])
            gradients["weight", layer] = weight_grad_t.transpose(1, 2)
            if self.A and self.A[layer].shape[2] > 0:
                gradients["A", layer] = torch.bmm(weight_grad_t.transpose(1, 2), self.B[layer])
                gradients["B", layer] = torch.bmm(weight_grad_t, self.A[layer])
            if layer > lowest:
                grad = torch.bmm(grad, merged[layer], out=spare[layer % 2])
        return losses, [gradients[kind, layer] for kind, layer, _ in trained]

    def _buffers(self, x: torch.Tensor) -> dict:
        """Activation and gradient buffers for inputs shaped like x, kept between calls."""
        if self._buffer_shape != x.shape:
            members, rows, width = x.shape
            self._buffer_shape = x.shape

            def empty(*shape):
                return torch.empty(shape, device=x.device)

            self._buffer_store = {
                "activations": [empty(members, rows, width) for _ in range(self.depth)],
                "difference": empty(members, rows, width),
                "input_grads": [empty(members, rows, width) for _ in range(2)],
                "weight_grads": [empty(members, width, width) for _ in range(self.depth)],
                "bias_grads": [empty(members, 1, width) for _ in range(self.depth)],
            }
        return self._buffer_store


class StackedTFN:
    """K transformers of equal width, depth, heads, sequence length and adapter rank.

    Each block has attention weights [K, 4H, width, width] with (Wq, Wk, Wv, Wo) of
    head 0, then of head 1, and so on, which is also the order of the attention
    adapters. It also has W1 and W2 weights [K, width, width] and biases [K, 1, width],
    and in the last block the W2 adapter. The output weight and the output adapter
    follow the blocks.

    The forward pass repeats TFNBlock.forward product for product, with each
    member's operands laid out in memory as torch.matmul lays them out for a single
    run, and the backward pass makes the products autograd makes for torch.mm (see
    RowLinear). Mirroring the products is what makes members match run(), because
    training amplifies any change of rounding. At depth 2, swapping the order in
    which one run adds two gradients moved its test loss by 0.5% within 100 steps.

    Members must share the adapter rank. Zero padding gives the same function, but
    the matrix kernels round a product with 5 or 7 columns differently from the
    same product padded to 8.

    The softmax is torch.softmax, or ClampedSoftmax where choose_softmax finds that
    it gives the same bits.
    """

    def __init__(self, models: list[TFN], seq_length: int, device):
        first = models[0]
        self.members = len(models)
        self.seq_length = seq_length
        self.n_head = first.blocks[0].n_head
        self.blocks = []
        for index in range(len(first.blocks)):
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
            if blocks[0].attention_adapters is not None:
                factors = [stack_adapters([b.attention_adapters[i] for b in blocks], device)
                           for i in range(4 * self.n_head)]
                stacked["attention_A"] = torch.stack([A for A, _ in factors], 1)
                stacked["attention_B"] = torch.stack([B for _, B in factors], 1)
            if blocks[0].W2_adapter is not None:
                stacked["W2_A"], stacked["W2_B"] = stack_adapters([b.W2_adapter for b in blocks], device)
            self.blocks.append(stacked)
        self.output = stack_tensors([m.output.weight for m in models], device)
        # choose_softmax() turns this on where it keeps the bits of torch.softmax.
        self.clamp_softmax = False
        self.output_A = self.output_B = None
        if first.output_adapter is not None:
            self.output_A, self.output_B = stack_adapters([m.output_adapter for m in models], device)

    def choose_softmax(self) -> bool:
        """Use ClampedSoftmax if it gives torch.softmax's bits on this device now; returns the choice.

        Call it inside the block that flushes subnormals, because without flushing the
        clamping changes the attention and the check fails. Only one thread qualifies, because
        the worker threads of PyTorch's thread pool keep the floating-point state that
        they started with, so flushing set on this thread need not reach them.
        """
        self.clamp_softmax = (USE_CLAMPED_SOFTMAX and self.output.device.type == "cpu"
                              and torch.get_num_threads() == 1 and clamped_softmax_is_exact(self.seq_length))
        return self.clamp_softmax

    def trained(self) -> list[tuple[str, int, torch.Tensor]]:
        """(name, block, tensor) of every adapter factor; the output adapter has block -1."""
        out = []
        for index, block in enumerate(self.blocks):
            for name in ("attention_A", "attention_B", "W2_A", "W2_B"):
                if block[name] is not None:
                    out.append((name, index, block[name]))
        if self.output_A is not None:
            out += [("output_A", -1, self.output_A), ("output_B", -1, self.output_B)]
        return out

    def loss_and_gradients(self, rows: torch.Tensor, target: torch.Tensor,
                           with_losses: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Compute the per-member MSE losses [K] and the trained() gradients by autograd.

        The losses come for free with the backward pass, so with_losses changes nothing.
        """
        params = [tensor for _, _, tensor in self.trained()]
        with torch.enable_grad():
            for param in params:
                param.requires_grad_(True)
            try:
                losses = member_mse(self.forward(rows), target)
                gradients = torch.autograd.grad(losses.sum(), params)
            finally:
                for param in params:
                    param.requires_grad_(False)
        return losses.detach(), list(gradients)

    def forward(self, rows: torch.Tensor, members: slice = slice(None)) -> torch.Tensor:
        """Compute the output token rows [k, n * seq_length, width] of the selected members."""
        for block in self.blocks:
            hidden = self._attention_and_w1(block, rows, members)
            rows = torch.baddbmm(block["b2"][members], hidden, block["W2"][members].transpose(1, 2))
            if block["W2_A"] is not None:
                delta = AdapterDelta.apply(block["W2_A"][members], block["W2_B"][members])
                rows = rows + RowLinear.apply(hidden, delta)
        out = RowLinear.apply(rows, self.output[members])
        if self.output_A is not None:
            out = out + RowLinear.apply(rows, AdapterDelta.apply(self.output_A[members], self.output_B[members]))
        return out

    def _attention_and_w1(self, block: dict, rows: torch.Tensor, members: slice) -> torch.Tensor:
        """Compute ReLU(W1 (sum of the heads' outputs) + b1) as token rows."""
        members_count, row_count, width = rows.shape
        weights = block["attention"][members]
        if block["attention_A"] is not None:
            A = block["attention_A"][members].flatten(0, 1)
            B = block["attention_B"][members].flatten(0, 1)
            weights = weights + AdapterDelta.apply(A, B).view(weights.shape)

        def columns(token_rows):
            # matmul(W, x) of a single run returns (batch, width, seq_length) contiguous.
            return token_rows.view(-1, self.seq_length, width).transpose(1, 2).contiguous()

        tokens = None
        for head in range(self.n_head):
            Wq, Wk, Wv, Wo = weights[:, 4 * head: 4 * head + 4].unbind(1)
            keys = columns(RowLinear.apply(rows, Wk))
            queries = columns(RowLinear.apply(rows, Wq))
            values = columns(RowLinear.apply(rows, Wv))
            scores = torch.bmm(keys.transpose(1, 2), queries)
            if self.clamp_softmax:
                attention = ClampedSoftmax.apply(scores)
            else:
                attention = torch.softmax(scores, dim=1)
            mixed = torch.bmm(values, attention).transpose(1, 2).reshape(members_count, row_count, width)
            # The layout of a head's output changes no rounding, because the next
            # step adds the heads elementwise, so it stays in token rows.
            head_out = RowLinear.apply(mixed, Wo)
            tokens = head_out if tokens is None else tokens + head_out

        # A single run's W1 input is not contiguous, so F.linear adds the bias after
        # the product instead of fusing it as baddbmm would.
        return F.relu(RowLinear.apply(tokens, block["W1"][members]) + block["b1"][members])


# torch.bmm computes a product with fewer than this many multiply-adds per member
# with its own loop, which rounds differently from the BLAS kernel behind torch.mm.
BMM_SMALL_PRODUCT = 400


def mm_per_member(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.bmm(a, b), rounded for every member as torch.mm rounds it."""
    if a.shape[1] * a.shape[2] * b.shape[2] < BMM_SMALL_PRODUCT:
        return torch.stack([torch.mm(x, y) for x, y in zip(a, b)])
    return torch.bmm(a, b)


class AdapterDelta(torch.autograd.Function):
    """A Bᵀ per member, with the gradients autograd computes for torch.mm(A, B.T).

    torch.mm's backward picks its products by the layout of its operands: for the
    transposed operand Bᵀ it computes the gradient of B as Gᵀ A, not as (Aᵀ G)ᵀ as
    torch.bmm's backward does. The two round differently.
    """

    @staticmethod
    def forward(ctx, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(A, B)
        return mm_per_member(A, B.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        A, B = ctx.saved_tensors
        return mm_per_member(grad, B), mm_per_member(grad.transpose(1, 2), A)


class RowLinear(torch.autograd.Function):
    """x Wᵀ per member for token rows x [K, n, width], as a single run's matmul computes it.

    torch.matmul(W, x) with a weight that requires grad folds the batch into one
    torch.mm(rows, W.T). The backward of that product computes G W for the rows and
    Gᵀ rows for W.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.bmm(x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


# exp(x) in float32 is below the smallest normal float, 2^-126, for every x < -87.34.
# A score clamped to 87.75 below its column's maximum therefore still gives exp = 0
# once subnormals are flushed. It also stays above -88, below which exp arguments made
# PyTorch's CPU softmax about twice as slow on the test machine.
CLAMP_DISTANCE = 87.75
FLUSHED_EXPONENT = -87.4

# False makes StackedTFN.choose_softmax always pick torch.softmax, for timing
# comparisons (benchmarks/bench_engine.py --plain-softmax).
USE_CLAMPED_SOFTMAX = True


class ClampedSoftmax(torch.autograd.Function):
    """Softmax over dim 1, as torch.softmax, of scores clamped to at least their column's maximum - 87.75.

    While subnormals are flushed, every clamped score gives exp = 0 both before and
    after clamping, so the attention keeps its bits. Saturated attention scores made
    PyTorch's CPU softmax over [3072, 10, 10] scores take 2.3 to 2.7 ms instead of
    1.1 ms (PyTorch 2.13, glibc x86-64), which clamping avoids. Whether the bits hold
    depends on the exp of the softmax kernel, so clamped_softmax_is_exact checks it
    before the engine uses this class. The backward pass is autograd's for
    torch.softmax, which reads only the output.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        top = scores.amax(1, keepdim=True)
        floor = top - CLAMP_DISTANCE
        # From a column maximum of about 1e8 on, float32 values are 8 or more apart and
        # the rounded floor may lie too close to the maximum. A NaN or infinite
        # maximum fails this test too, and the scores then stay as they are.
        if bool(((floor - top) < FLUSHED_EXPONENT).all()):
            scores = torch.maximum(scores, floor)
        attention = torch.softmax(scores, dim=1)
        ctx.save_for_backward(attention)
        return attention

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        attention, = ctx.saved_tensors
        return torch._softmax_backward_data(grad, attention, 1, attention.dtype)


def clamped_softmax_is_exact(seq_length: int) -> bool:
    """Check that ClampedSoftmax gives torch.softmax's bits and gradients on CPU in the current state.

    The scores spread over several hundred, so that columns mix unsaturated scores,
    scores near the flushing threshold and scores whose exp underflows.
    """
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(256, seq_length, seq_length, generator=generator) * 60
    grad = torch.randn(scores.shape, generator=generator)

    def attention_and_gradient(softmax):
        with torch.enable_grad():
            inputs = scores.clone().requires_grad_(True)
            attention = softmax(inputs)
            attention.backward(grad)
        return attention.detach(), inputs.grad

    clamped, clamped_grad = attention_and_gradient(ClampedSoftmax.apply)
    plain, plain_grad = attention_and_gradient(lambda inputs: torch.softmax(inputs, dim=1))
    return torch.equal(clamped, plain) and torch.equal(clamped_grad, plain_grad)
