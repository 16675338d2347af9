"""Models of a stack that skip a step: an on_gradients hook returned `skip` for them (e.g. non-finite gradients).

The stack's optimizer steps every model at once, so the skipped models are put back afterwards: their slices of
the parameters, the optimizer state and the plugins' state as before the step. Two ways, with the same numbers
(tests/test_regularizers.py checks bit for bit):
- on a CPU the host reads the mask, and copies only the skipped models' slices (`snapshot` / `restore`);
- on a GPU reading the mask would wait for the device on every step (and cannot be captured in a CUDA graph),
  so every tensor is copied whole and the skipped models are put back by torch.where (`snapshot_whole` /
  `restore_masked`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

Snapshot = list[tuple[torch.Tensor, torch.Tensor | None]]


def stacked(t: torch.Tensor, K: int) -> bool:
    """Does this tensor hold one slice per model ([K, …]), rather than a value shared by the stack?"""
    return t.dim() > 0 and t.shape[0] == K


def stacked_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, K: int) -> list[torch.Tensor]:
    """The optimizer's per-model state tensors of parameter p (Adam's moments; not its shared step count)."""
    return [v for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor) and stacked(v, K)]


def snapshot(skip: torch.Tensor, params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer,
             plugin_state: Iterable[torch.Tensor], K: int) -> Snapshot:
    """Copies of the skipped models' slices of parameters, optimizer and plugin state. A parameter with no
    optimizer state yet is marked None: its new state is zeroed for those models, as if they had not stepped.
    A scalar state such as Adam's step count is shared by the stack and is not rolled back."""
    saved: Snapshot = []
    for p in params:
        saved.append((p, p.detach()[skip].clone()))
        state = stacked_state(optimizer, p, K)
        if state:
            saved += [(t, t[skip].clone()) for t in state]
        else:
            saved.append((p, None))
    saved += [(t, t[skip].clone()) for t in plugin_state]
    return saved


def restore(skip: torch.Tensor, saved: Snapshot, optimizer: torch.optim.Optimizer, K: int) -> None:
    for t, value in saved:
        if value is None:
            for s in stacked_state(optimizer, t, K):
                s[skip] = 0
        else:
            t.detach()[skip] = value


def snapshot_whole(params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer,
                   plugin_state: Iterable[torch.Tensor]) -> Snapshot:
    """snapshot without reading the mask on the host: copies of every parameter, optimizer state and plugin
    state tensor, taken on every step a gradient hook can skip (on a GPU a few device-side copies, capturable)."""
    saved: Snapshot = []
    for p in params:
        saved.append((p.detach(), p.detach().clone()))
        state = optimizer.state.get(p)
        if state:
            saved += [(v, v.clone()) for v in state.values() if isinstance(v, torch.Tensor)]
        else:
            saved.append((p, None))
    saved += [(t, t.clone()) for t in plugin_state]
    return saved


def restore_masked(skip: torch.Tensor, saved: Snapshot, optimizer: torch.optim.Optimizer, K: int) -> None:
    """Put the skipped models back by torch.where, with the results of snapshot + restore: their slices as before
    the step, a fresh (zero) state where there was none, and a scalar state shared by the stack (Adam's step
    count) rolled back only when every model skipped, as if no step had run."""
    every = skip.all()
    for t, value in saved:
        if value is None:  # the optimizer state was created by this step
            for s in optimizer.state.get(t, {}).values():
                if isinstance(s, torch.Tensor):
                    s.masked_fill_(_per_model(skip, s) if stacked(s, K) else every, 0)
        else:
            torch.where(_per_model(skip, t) if stacked(t, K) else every, value, t, out=t)


def _per_model(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-model mask [K] shaped to broadcast against a stacked tensor [K, …]."""
    return mask.view(-1, *([1] * (like.dim() - 1)))
