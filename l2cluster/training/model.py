"""The stacked MLP: K independent models of one architecture, trained as one module with batched matmuls.

Parameters carry a leading model axis ([K, in, out] weights, [K, out] biases), inputs are [K, B, 784] and
every model sees its own batch. K = 1 is an ordinary MLP and runs as plain matmuls; K > 1 runs as one batched
matmul (baddbmm), or as K plain matmuls on the device types in PER_MEMBER_DEVICES.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


class _PerMemberLinear(torch.autograd.Function):
    """y[k] = x[k] @ weight[k] + bias[k] as K addmm calls, forward and backward, each the kernel that a one-model
    layer runs, so model k's numbers are those of the same model trained alone. Results are written into stacked
    buffers, so no gradient is copied or stacked afterwards."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        out = x.new_empty(x.shape[0], x.shape[1], weight.shape[2])
        for k in range(x.shape[0]):
            torch.addmm(bias[k], x[k], weight[k], out=out[k])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        # The products addmm's own backward computes: grad @ weightᵀ and xᵀ @ grad.
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty(x.shape)
            for k in range(x.shape[0]):
                torch.mm(grad[k], weight[k].t(), out=grad_x[k])
        if ctx.needs_input_grad[1]:
            grad_weight = torch.empty_like(weight)
            for k in range(x.shape[0]):
                torch.mm(x[k].t(), grad[k], out=grad_weight[k])
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(1)
        return grad_x, grad_weight, grad_bias


PER_MEMBER_DEVICES: set[str] = set()
"""Device types on which K > 1 layers run as K plain matmuls (_PerMemberLinear) instead of one baddbmm. Empty:
on CUDA baddbmm is one launch instead of K, and on the 2-core CPU we measured (bench/pack_cost.py
--per-member-cpu, 1 and 2 threads) K addmm calls were no faster per model than baddbmm, and slower with 2
threads on a busy machine (each small matmul is its own parallel region). Re-measure on a bigger CPU."""


class StackedLinear(nn.Module):
    """K independent linear layers: y[k] = x[k] @ weight[k] + bias[k]."""

    def __init__(self, num_models: int, in_features: int, out_features: int, *, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_models, in_features, out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(num_models, out_features, dtype=dtype, device=device))

    @torch.no_grad()
    def reset_parameters(self, generators: Sequence[torch.Generator]) -> None:
        """nn.Linear's default init, U(−1/√fan_in, 1/√fan_in) for weight and bias, one stream per model.

        Drawn on the CPU and copied, so a seed gives the same model on every device and every DDP rank."""
        fan_in = self.weight.shape[1]
        bound = 1 / math.sqrt(fan_in)
        for k, gen in enumerate(generators):
            # Drawn as [out, in] like nn.Linear's weight, then transposed to our [in, out] layout.
            w = torch.empty(self.weight.shape[2], fan_in, dtype=self.weight.dtype)
            w.uniform_(-bound, bound, generator=gen)
            b = torch.empty(self.bias.shape[1], dtype=self.bias.dtype).uniform_(-bound, bound, generator=gen)
            self.weight[k].copy_(w.t())
            self.bias[k].copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            # One model: a plain addmm, as fast as nn.Linear. squeeze, not [0]: its backward is a view, while
            # indexing's backward allocates and fills a full-size gradient every step.
            return torch.addmm(self.bias.squeeze(0), x.squeeze(0), self.weight.squeeze(0)).unsqueeze(0)
        if x.device.type in PER_MEMBER_DEVICES:
            return _PerMemberLinear.apply(x, self.weight, self.bias)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


class StackedMLP(nn.Module):
    """K MLPs 784 → hidden… → 10 with one activation function; `on_activation` transforms hidden outputs."""

    def __init__(
        self, num_models: int, hidden_sizes: Sequence[int], *, activation: str = "relu",
        in_features: int = 784, num_classes: int = 10, dtype=torch.float32, device="cpu",
    ):
        super().__init__()
        sizes = [in_features, *hidden_sizes, num_classes]
        self.num_models = num_models
        self.num_classes = num_classes
        self.num_hidden = len(hidden_sizes)
        self.act = ACTIVATIONS[activation]
        self.layers = nn.ModuleList(
            StackedLinear(num_models, a, b, dtype=dtype, device=device) for a, b in zip(sizes[:-1], sizes[1:])
        )

    def reset_parameters(self, seeds: Sequence[int]) -> None:
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        for layer in self.layers:
            # type-check: torch types nn.Module attributes as Tensor
            layer.reset_parameters(gens)  # type: ignore[operator]

    def forward(
        self, x: torch.Tensor, on_activation: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x: [K, B, 784] → logits [K, B, 10]."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_hidden:
                x = self.act(x)
                if on_activation is not None:
                    x = on_activation(x, i)
        return x
