"""The regularizer plugin contract: the base class, the hooks a plugin may implement, and their arguments.

This module is the public API plugin authors write against. A plugin is a subclass of `Regularizer` with a
unique `name`, a pydantic `Config` and any subset of the hooks in `HookSpecs`. The trainer calls the hooks at
fixed points of every step:

    penalty → backward → (DDP all-reduce) → on_gradients → before_step → optimizer step → after_step

plus `on_activation` on every hidden layer's output, in training only.

Every tensor a hook sees has a leading model axis of size K: the trainer trains K models stacked in one
(K = 1 for an ordinary job). Numeric config fields reach the hook as tensors of shape [K] (a list of numbers
as [K, L]) in `hp`; other fields (strings, booleans) are shared by the K models and arrive as plain values.
Written this way, one implementation serves a single job, DDP ranks and packed training unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

__all__ = [
    "HOOK_ARGS",
    "HookError",
    "HookSpecs",
    "HyperParams",
    "PluginError",
    "Regularizer",
    "StackedRNG",
    "hook",
    "per_model_ndim",
    "per_model_norm",
    "select_params",
    "sum_of_squares",
]


class HookSpecs:
    """The hooks a regularizer may implement. An implementation takes any subset of these arguments, by name.

    Shared arguments: `params` maps parameter names ("layers.0.weight", "layers.0.bias", …) to the stacked
    parameters, shape [K, …] (their `.grad` is set in the gradient hooks); `hp` holds the plugin's config for
    the K models (see `HyperParams`); `epoch` (1-based) and `step` (0-based, global over the run) say where
    training is.
    """

    def penalty(self, params: Mapping[str, torch.Tensor], hp: HyperParams, epoch: int, step: int) -> torch.Tensor:
        """Return a loss term per model, shape [K], added to each model's loss before backward."""

    def on_activation(
        self, x: torch.Tensor, layer: int, num_layers: int, hp: HyperParams, rng: StackedRNG
    ) -> torch.Tensor:
        """Return the transformed output [K, B, H] of hidden layer `layer` (0-based of `num_layers`).

        Called in training only; evaluation never calls it. Draw randomness from `rng` only, so that every
        model of a stack has its own reproducible stream."""

    def on_gradients(
        self, params: Mapping[str, torch.Tensor], hp: HyperParams, epoch: int, step: int
    ) -> Mapping[str, torch.Tensor] | None:
        """Inspect or change `p.grad` in place, after the DDP all-reduce (every rank sees the same gradients).

        May return per-model tensors of shape [K]: the key "skip" (bool) skips that model's optimizer step;
        other keys are counters summed into the epoch's metrics as `<key>_steps`."""

    def before_step(
        self, params: Mapping[str, torch.Tensor], hp: HyperParams, lr: torch.Tensor, epoch: int, step: int
    ) -> None:
        """Change parameters in place right before the optimizer step; `lr` is the scheduled lr, shape [K]."""

    def after_step(
        self, params: Mapping[str, torch.Tensor], hp: HyperParams, lr: torch.Tensor, epoch: int, step: int
    ) -> None:
        """Change parameters in place right after the optimizer step; `lr` is the scheduled lr, shape [K]."""


def _spec_args(fn: Callable) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(fn).parameters if p != "self")


HOOK_ARGS: dict[str, tuple[str, ...]] = {
    name: _spec_args(fn)
    for name, fn in vars(HookSpecs).items()
    if callable(fn) and not name.startswith("_")
}
"""Each hook's name and the arguments the trainer offers it, in the order of the step."""

HOOK_MARK = "_l2cluster_hook"


def hook(fn: Callable) -> Callable:
    """Mark a method as a hook implementation. Optional for hooks named exactly as in `HookSpecs`, but a marked
    method whose name is not a hook is refused at registration (catches typos such as `on_gradient`)."""
    setattr(fn, HOOK_MARK, True)
    return fn


class Regularizer:
    """Base class of every regularizer plugin.

    Subclasses set `name` (lower-case, unique: it is the `name` a job spec's regularizer entry uses and the
    segment of sweep paths such as `regularizers.l2.strength`) and `Config` (a pydantic model with
    `extra="forbid"` and a docstring under every field), and implement hooks from `HookSpecs`. Hooks must keep
    no state on the instance: one instance serves every job of the process.
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]


class PluginError(ValueError):
    """A plugin was refused at registration; names the plugin, the hook and the argument where they apply."""

    def __init__(self, plugin: str, reason: str, hook: str | None = None, argument: str | None = None):
        self.plugin, self.reason, self.hook, self.argument = plugin, reason, hook, argument
        where = f"plugin {plugin!r}" + (f", hook {hook!r}" if hook else "") + (
            f", argument {argument!r}" if argument else ""
        )
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        return (type(self), (self.plugin, self.reason, self.hook, self.argument))


class HookError(RuntimeError):
    """A plugin hook raised or returned something unusable while training; the job fails with this text."""

    def __init__(self, plugin: str, hook: str, message: str):
        self.plugin, self.hook, self.message = plugin, hook, message
        super().__init__(f"plugin {plugin!r}, hook {hook!r}: {message}")

    def __reduce__(self):
        return (type(self), (self.plugin, self.hook, self.message))


class HyperParams:
    """A plugin's config for K stacked models: numbers as tensors [K] (lists of numbers as [K, L]), other
    values as the one value the K models share. Read fields as attributes: `hp.strength`."""

    def __init__(self, configs: Sequence[BaseModel], *, dtype: torch.dtype, device: torch.device | str):
        if not configs:
            raise ValueError("HyperParams needs at least one config")
        self._fields: dict[str, Any] = {}
        self._raw: dict[str, list[Any]] = {}
        for field in type(configs[0]).model_fields:
            if field == "name":
                continue
            values = [getattr(c, field) for c in configs]
            self._raw[field] = values
            self._fields[field] = _stack_field(field, values, dtype, device)

    def shared(self, field: str) -> Any:
        """The one value of a numeric field that the algorithm needs as a Python number (e.g. a norm's p);
        raises if the stacked models disagree on it."""
        values = self._raw[field]
        if any(v != values[0] for v in values[1:]):
            raise ValueError(f"field {field!r} must be equal for models trained together, got {values}")
        return values[0]

    def __getattr__(self, item: str) -> Any:
        try:
            return self.__dict__["_fields"][item]
        except KeyError:
            raise AttributeError(f"config has no field {item!r}") from None

    def __repr__(self) -> str:
        return f"HyperParams({self._fields!r})"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _stack_field(field: str, values: list[Any], dtype: torch.dtype, device) -> Any:
    if all(_is_number(v) for v in values):
        return torch.tensor(values, dtype=dtype, device=device)
    if all(isinstance(v, (list, tuple)) and v and all(_is_number(x) for x in v) for v in values):
        if len({len(v) for v in values}) != 1:
            raise ValueError(f"field {field!r}: stacked models have lists of different lengths: {values}")
        return torch.tensor([list(v) for v in values], dtype=dtype, device=device)
    if any(v != values[0] for v in values[1:]):
        raise ValueError(
            f"field {field!r}: stacked models must share non-numeric values, got {values}; "
            "only numeric hyperparameters may differ between models trained together"
        )
    return values[0]


class StackedRNG:
    """Random numbers with one independent, seeded stream per stacked model (and per DDP rank)."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform [0, 1) numbers of shape [K, *shape]; row k comes from model k's stream."""
        out = torch.empty((len(self.generators), *shape), dtype=dtype, device=self.device)
        if len(self.generators) == 1:  # the one row is the whole tensor
            return out.uniform_(generator=self.generators[0])
        for row, gen in zip(out, self.generators):
            row.uniform_(generator=gen)
        return out

    def state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def set_state(self, states: Sequence[torch.Tensor]) -> None:
        for g, s in zip(self.generators, states):
            g.set_state(s)


def _norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖t_k‖₂ of each model's slice of each tensor: [len(tensors), K]. One fused call when K = 1."""
    if tensors[0].shape[0] == 1:
        return torch.stack(torch._foreach_norm(tensors)).unsqueeze(1)
    return torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1) for t in tensors])


def per_model_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """‖θ_k‖₂ over all of `tensors` for each model (the 2-norm of the per-tensor 2-norms): shape [K]."""
    return torch.linalg.vector_norm(_norms(list(tensors)), dim=0)


class _SumOfSquares(torch.autograd.Function):
    """Σ‖w‖² per model with a one-pass backward (2w·g), instead of autograd's four passes through pow or norm:
    on CPU an L2 penalty is memory-bound, and this halves its cost."""

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*tensors)
        return _norms(tensors).pow(2).sum(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        tensors, twice = ctx.saved_tensors, 2 * grad
        if twice.shape[0] == 1:
            return tuple(torch._foreach_mul(tensors, twice.view(())))
        return tuple(t * twice.view(-1, *([1] * (t.dim() - 1))) for t in tensors)


def sum_of_squares(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ‖w‖² over `tensors` for each model: shape [K], differentiable (gradient 2w)."""
    return _SumOfSquares.apply(*tensors)


def per_model_ndim(p: torch.Tensor) -> int:
    """Dimensions of one model's slice of a stacked parameter (a bias [K, H] has 1)."""
    return p.dim() - 1


def select_params(params: Mapping[str, torch.Tensor], exclude_1d: bool) -> Iterator[torch.Tensor]:
    """The parameters weight decay applies to: all of them, or (exclude_1d) only the matrices — biases and
    other 1-D parameters excluded, as timm and most recipes do."""
    for p in params.values():
        if not exclude_1d or per_model_ndim(p) >= 2:
            yield p
