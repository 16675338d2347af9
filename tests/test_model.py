"""The stacked layer's per-member path (K plain matmuls) computes what the batched matmul does, forward and
backward, and a stack member computes what the model alone does."""

from __future__ import annotations

import pytest
import torch

from l2cluster.training import model as model_module
from l2cluster.training.model import StackedMLP, _PerMemberLinear


def _layer_inputs(K, requires_x_grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(K, 5, 7, dtype=torch.float64, generator=g).requires_grad_(requires_x_grad)
    w = torch.randn(K, 7, 3, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(K, 3, dtype=torch.float64, generator=g).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("K", [2, 5])
def test_per_member_layer_equals_baddbmm(K):
    x, w, b = _layer_inputs(K)
    upstream = torch.randn(K, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for fn in (lambda: _PerMemberLinear.apply(x, w, b), lambda: torch.baddbmm(b.unsqueeze(1), x, w)):
        out = fn()
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out, (x, w, b), upstream))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for mine, batched in zip(grads[0], grads[1]):
        torch.testing.assert_close(mine, batched, rtol=1e-12, atol=1e-12)


def test_per_member_layer_passes_gradcheck_and_skips_unneeded_grads():
    x, w, b = _layer_inputs(3)
    assert torch.autograd.gradcheck(_PerMemberLinear.apply, (x, w, b))
    x, w, b = _layer_inputs(3, requires_x_grad=False)  # the first layer's input is data
    _PerMemberLinear.apply(x, w, b).sum().backward()
    assert x.grad is None and w.grad is not None and b.grad is not None


def test_per_member_member_equals_the_model_alone(monkeypatch):
    """Member k of a stack runs the very kernels of a one-model MLP: the same logits and gradients."""
    monkeypatch.setattr(model_module, "PER_MEMBER_DEVICES", {"cpu"})
    stacked = StackedMLP(3, [16, 8], dtype=torch.float64)
    stacked.reset_parameters([11, 12, 13])
    alone = StackedMLP(1, [16, 8], dtype=torch.float64)
    alone.reset_parameters([12])
    x = torch.rand(3, 4, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    stacked(x).sum().backward()
    alone(x[1:2]).sum().backward()
    for (name, p), q in zip(stacked.named_parameters(), alone.parameters()):
        torch.testing.assert_close(p.grad[1:2], q.grad, rtol=1e-14, atol=1e-14, msg=name)


def test_the_paths_agree_in_a_model_and_the_check_can_fail(monkeypatch):
    """Both paths give one model the same logits; control: one weight changed by 0.1% is told apart."""
    monkeypatch.setattr(model_module, "PER_MEMBER_DEVICES", set())
    stacked = StackedMLP(2, [8], dtype=torch.float64)
    stacked.reset_parameters([1, 2])
    x = torch.rand(2, 4, 784, dtype=torch.float64)
    batched = stacked(x).detach()
    monkeypatch.setattr(model_module, "PER_MEMBER_DEVICES", {"cpu"})
    assert torch.allclose(stacked(x).detach(), batched, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        stacked.layers[0].weight[1].mul_(1.001)
    assert not torch.allclose(stacked(x).detach(), batched, rtol=1e-12, atol=1e-12)
