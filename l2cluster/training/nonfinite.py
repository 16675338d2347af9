"""Who made the numbers non-finite: a real divergence of the model, or a plugin hook?

When a model's loss becomes non-finite in an epoch, the trainer replays that epoch from its start (`blame`) with a
`NonFiniteProbe` as the hooks' watch. The probe notes, per model, the first point of the step where numbers turned
non-finite: after a hook (the plugin is to blame: the model fails with the plugin's error) or in the model's own
forward pass or optimizer step (a divergence). Outside a replay the watch is `NoWatch`, whose checks do nothing,
so training pays nothing for this.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist

from l2cluster.plugin import HookError

if TYPE_CHECKING:
    from l2cluster.training.trainer import Trainer

_NO_EVENT = 2**62
_EVENTS_PER_STEP = 100_000

Tensors = torch.Tensor | Sequence[torch.Tensor]


class Watch(Protocol):
    """What the step and the hooks report: the probe records it, NoWatch ignores it."""

    def made_nan(self, before: Tensors, after: torch.Tensor, plugin: str, what: str) -> None: ...

    def in_place(self, plugin: str, hook: str, watched: Mapping[str, Sequence[torch.Tensor]],
                 only_stepped: bool = False) -> AbstractContextManager: ...

    def forward(self, ce: torch.Tensor) -> None: ...

    def optimizer_step(self, skip: torch.Tensor | None, params: Sequence[torch.Tensor]) -> None: ...


class NoWatch:
    """The watch of ordinary training: every check is free."""

    def made_nan(self, before: Tensors, after: torch.Tensor, plugin: str, what: str) -> None:
        pass

    def in_place(self, plugin: str, hook: str, watched: Mapping[str, Sequence[torch.Tensor]],
                 only_stepped: bool = False) -> AbstractContextManager:
        return nullcontext()

    def forward(self, ce: torch.Tensor) -> None:
        pass

    def optimizer_step(self, skip: torch.Tensor | None, params: Sequence[torch.Tensor]) -> None:
        pass


class NonFiniteProbe:
    """Records, per model, the first point of a replayed epoch where numbers became non-finite: which plugin hook
    made them so, or None where the model's own forward pass or optimizer step did (a real divergence)."""

    def __init__(self, K: int, device: torch.device):
        self.first = torch.full((K,), _NO_EVENT, dtype=torch.long, device=device)
        self.labels: dict[int, tuple[str | None, str]] = {}
        self.step = self.pos = 0
        self.stepped = torch.ones(K, dtype=torch.bool, device=device)  # the models the optimizer step updated

    def start_step(self, step: int) -> None:
        self.step, self.pos = step, 0

    def saw(self, bad: torch.Tensor, plugin: str | None, what: str) -> None:
        # Events are numbered in the order a step runs them, the same on every step and every DDP rank.
        code = self.step * _EVENTS_PER_STEP + self.pos
        self.labels[self.pos] = (plugin, what)
        self.pos += 1
        self.first[bad & (self.first == _NO_EVENT)] = code

    # -- the watch ------------------------------------------------------------------------------------------
    def made_nan(self, before: Tensors, after: torch.Tensor, plugin: str, what: str) -> None:
        """A hook returned `after` from `before`: NaN out of finite input is the hook's doing."""
        finite = _finite(before) if isinstance(before, torch.Tensor) else _all_finite(before)
        self.saw(finite & _nan(after), plugin, what)

    @contextmanager
    def in_place(self, plugin: str, hook: str, watched: Mapping[str, Sequence[torch.Tensor]],
                 only_stepped: bool = False) -> Iterator[None]:
        """Around a hook that changes tensors in place: those finite before and NaN after are the hook's doing
        (after_step: only in models the optimizer step updated)."""
        finite = {name: _all_finite(ts) for name, ts in watched.items()}
        if only_stepped:
            finite = {name: self.stepped & f for name, f in finite.items()}
        yield
        for name, ts in watched.items():
            self.saw(finite[name] & _any_nan(ts), plugin, f"{hook}:made the {name} NaN")

    def forward(self, ce: torch.Tensor) -> None:
        """The forward pass's cross-entropy per model and example [K, B]."""
        self.saw(~_finite(ce.sum(1)), None, "forward")  # the model's own numbers overflowed: a divergence

    def optimizer_step(self, skip: torch.Tensor | None, params: Sequence[torch.Tensor]) -> None:
        # Non-finite gradients or an overflow in the update: a divergence.
        self.stepped = ~skip if skip is not None else torch.ones_like(self.stepped)
        self.saw(self.stepped & ~_all_finite(params), None, "optimizer step")

    def errors(self, models: list[int], epoch: int) -> dict[int, str]:
        out = {}
        first = self.first.cpu()
        for k in models:
            code = int(first[k])
            if code == _NO_EVENT:
                continue
            plugin, what = self.labels[code % _EVENTS_PER_STEP]
            if plugin is not None:
                hook, made = what.split(":")
                out[k] = str(HookError(plugin, hook, f"{made} in epoch {epoch}, step "
                                                     f"{code // _EVENTS_PER_STEP + 1} of the epoch"))
        return out


# -- replaying an epoch -------------------------------------------------------------------------------------
def snapshot(trainer: Trainer) -> dict:
    """Copies of what one epoch's steps change: parameters, optimizer state, random streams, plugin state, step
    count (milliseconds per epoch)."""
    params = trainer.params.values()
    return {
        "params": [p.detach().clone() for p in params],
        "optimizer": [{k: v.clone() if isinstance(v, torch.Tensor) else v
                       for k, v in trainer.optimizer.state.get(p, {}).items()} for p in params],
        "dropout_rng": trainer.rng.state(),
        "shared_rng": trainer.shared_rng.state(),
        "plugin_state": [{k: v.clone() for k, v in p.state.items()} for p in trainer.plugins],
        "step_count": trainer.step_count,
    }


def rewind(trainer: Trainer, saved: dict) -> None:
    """Put back a snapshot(), in place: a captured CUDA graph keeps reading the same tensors."""
    for p, value, state in zip(trainer.params.values(), saved["params"], saved["optimizer"]):
        p.detach().copy_(value)
        current = trainer.optimizer.state.get(p, {})
        for key, v in current.items():
            if key in state:
                if isinstance(v, torch.Tensor):
                    v.copy_(state[key])
                else:
                    current[key] = state[key]
            elif isinstance(v, torch.Tensor):  # not there yet at the snapshot: zero is a fresh state
                v.zero_()
    trainer.rng.set_state(saved["dropout_rng"])
    trainer.shared_rng.set_state(saved["shared_rng"])
    trainer.hooks.load_state(saved["plugin_state"])
    trainer.step_count = saved["step_count"]


def blame(trainer: Trainer, epoch: int, order: torch.Tensor, epoch_start: dict, steps: int,
          models: list[int]) -> dict[int, str]:
    """The loss of `models` became non-finite in this epoch: replay the epoch's `steps` from `epoch_start` (a
    snapshot), watching every hook, and return {model: error} for those whose numbers a plugin hook made
    non-finite from finite ones. Models whose own numbers overflowed (a real divergence) are not in the result;
    neither are those the replay does not reproduce. Costs at most one more epoch, and only when something
    diverged. The trainer is left as it was."""
    batch = trainer.cfg.data.batch_size
    now = snapshot(trainer)
    probe = NonFiniteProbe(trainer.K, trainer.device)
    sums = torch.zeros_like(trainer.sums)
    counters = {k: torch.zeros_like(v) for k, v in trainer.counters.items()}
    trainer.hooks.watch = probe
    try:
        rewind(trainer, epoch_start)
        for s in range(steps):
            probe.start_step(s)
            trainer.step(order[:, s * batch:(s + 1) * batch], epoch, sums, counters)
            if trainer.distributed:  # every rank must replay the same steps; the earliest event wins
                dist.all_reduce(probe.first, op=dist.ReduceOp.MIN)
            if bool((probe.first[models] < _NO_EVENT).all()):
                break
    finally:
        trainer.hooks.watch = NoWatch()
        rewind(trainer, now)
    return probe.errors(models, epoch)


# -- per-model finiteness of stacked tensors [K, …] ---------------------------------------------------------
def _finite(t: torch.Tensor) -> torch.Tensor:
    """Per model: is every value of this stacked tensor [K, …] finite? Shape [K]."""
    t = t.detach()
    return torch.isfinite(t).flatten(1).all(1) if t.dim() > 1 else torch.isfinite(t)


def _nan(t: torch.Tensor) -> torch.Tensor:
    """Per model: does this stacked tensor [K, …] hold a NaN? Shape [K]."""
    t = t.detach()
    return torch.isnan(t).flatten(1).any(1) if t.dim() > 1 else torch.isnan(t)


def _all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.stack([_finite(t) for t in tensors]).all(0)


def _any_nan(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.stack([_nan(t) for t in tensors]).any(0)
