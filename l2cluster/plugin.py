"""The regularizer plugin contract: the base class, the hooks a plugin may implement, and their arguments.

This module is the public API plugin authors write against. A plugin is a subclass of `Regularizer` with a
unique `name`, a pydantic `Config` and any subset of the hooks in `HookSpecs`. The trainer calls the hooks at
fixed points of every step:

    on_batch → forward (on_activation) → cross-entropy + example_penalty → + penalty → backward
             → (DDP all-reduce) → on_gradients → before_step → optimizer step → after_step

`init_state` runs once when training starts, and `eval_params` before every evaluation.

Every tensor a hook sees has a leading model axis of size K: the trainer trains K models stacked in one
(K = 1 for an ordinary job). Numeric config fields reach the hook as tensors of shape [K] (a list of numbers
as [K, L]) in `hp`; other fields (strings, booleans) are shared by the K models and arrive as plain values.
Written this way, one implementation serves a single job, DDP ranks and packed training unchanged.

Parameter layout: `params["layers.{i}.weight"]` is [K, in, out] (the transpose of nn.Linear's [out, in], so a
hidden unit's incoming weights are `w[k, :, j]`) and `params["layers.{i}.bias"]` is [K, out].
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from l2cluster.errors import InputError, L2ClusterError

__all__ = [
    "HOOK_ARGS",
    "HookError",
    "HookSpecs",
    "HyperParams",
    "PluginError",
    "Regularizer",
    "StackedRNG",
    "TrainContext",
    "hook",
    "per_model_ndim",
    "per_model_norm",
    "select_params",
    "sum_of_squares",
]


@dataclass(frozen=True)
class TrainContext:
    """Where a step runs, for hooks whose numbers depend on it (the `ctx` argument).

    The trainer averages every example's loss over the *global* batch (all DDP ranks together): a loss term per
    example returned by `example_penalty` is averaged the same way, so it needs no correction for the number of
    ranks. A `penalty` is one value per model, added once whatever the number of ranks."""

    num_models: int
    """K: models trained stacked in this process."""
    world_size: int
    """DDP ranks training each model."""
    rank: int
    """This process's rank (0 without DDP)."""
    global_batch: int
    """Examples in this step's batch over all ranks (the last batch of an epoch may be smaller)."""
    local_batch: int
    """Examples of this step's batch on this rank."""
    steps_per_epoch: int
    """Optimizer steps in one epoch."""
    train_size: int
    """Examples in the training split."""
    num_classes: int
    """Classes of the task (10 for MNIST)."""
    device: torch.device
    dtype: torch.dtype
    """The parameters' device and floating-point type."""


class HookSpecs:
    """The hooks a regularizer may implement. An implementation takes any subset of these arguments, by name.

    Shared arguments: `params` maps parameter names ("layers.0.weight", "layers.0.bias", …) to the stacked
    parameters (weights [K, in, out], biases [K, out]; their `.grad` is set in the gradient hooks); `hp` holds the
    plugin's config for the K models (see `HyperParams`); `epoch` (1-based) and `step` (0-based, global over the
    run) say where training is (a hook that takes either trains without CUDA graphs); `ctx` is the
    `TrainContext`; `state` is the plugin's own per-job state (see `init_state`); `rng` is a `StackedRNG`, one
    seeded stream per model: in `on_batch` and the parameter hooks it is the same on every DDP rank (so ranks
    stay in step), in `on_activation` and `example_penalty` it is this rank's own.
    """

    # type-check: a hook's documented signature: plugins override it
    def init_state(self, params: Mapping[str, torch.Tensor], hp: HyperParams, ctx: TrainContext  # type: ignore[empty-body]
                   ) -> Mapping[str, torch.Tensor]:
        """Opt-in per-job state: return named tensors with the model axis first ([K, …]), on `ctx.device`.

        Called once before training. The trainer passes them as `state` to every hook that takes it (change them
        in place), saves them in checkpoints and restores them on resume, so a resumed run continues exactly."""

    def on_batch(
        self, x: torch.Tensor, targets: torch.Tensor, hp: HyperParams, rng: StackedRNG, ctx: TrainContext,
        state: Mapping[str, torch.Tensor], epoch: int, step: int,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Transform a training batch before the forward pass (input noise, mixup); None leaves it unchanged.

        `x` is the global batch [K, B, 784] (every rank sees all of it and keeps its own shard afterwards, so a
        run gives the same batches on any number of ranks); `targets` are class indices [K, B] (int64) or, once
        a plugin has softened them, class probabilities [K, B, C]. Return `(x, targets)` of the same shapes;
        targets may become probabilities [K, B, C]. Training only: evaluation never calls it."""

    # type-check: a hook's documented signature: plugins override it
    def on_activation(  # type: ignore[empty-body]
        self, x: torch.Tensor, layer: int, num_layers: int, hp: HyperParams, rng: StackedRNG, ctx: TrainContext,
        state: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """Return the transformed output [K, B, H] of hidden layer `layer` (0-based of `num_layers`).

        Called in training only; evaluation never calls it. Draw randomness from `rng` only, so that every
        model of a stack has its own reproducible stream."""

    # type-check: a hook's documented signature: plugins override it
    def example_penalty(  # type: ignore[empty-body]
        self, logits: torch.Tensor, targets: torch.Tensor, hidden: Sequence[torch.Tensor],
        params: Mapping[str, torch.Tensor], hp: HyperParams, rng: StackedRNG, ctx: TrainContext,
        state: Mapping[str, torch.Tensor], epoch: int, step: int,
    ) -> torch.Tensor:
        """Return a loss term per example, shape [K, B], added to each example's cross-entropy.

        `logits` [K, B, C] and `targets` (as after `on_batch`: [K, B] indices or [K, B, C] probabilities) are
        this rank's examples; `hidden` holds every hidden layer's output [K, B, H] after its activation function
        and before `on_activation` hooks. The trainer averages the term over the global batch like the
        cross-entropy, so it is right on any number of ranks (label smoothing, confidence and activity
        penalties)."""

    # type-check: a hook's documented signature: plugins override it
    def penalty(  # type: ignore[empty-body]
        self, params: Mapping[str, torch.Tensor], hp: HyperParams, epoch: int, step: int, ctx: TrainContext,
        rng: StackedRNG, state: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """Return a loss term per model, shape [K], added to each model's loss before backward (once, whatever
        the number of DDP ranks)."""

    def on_gradients(
        self, params: Mapping[str, torch.Tensor], hp: HyperParams, epoch: int, step: int, ctx: TrainContext,
        rng: StackedRNG, state: Mapping[str, torch.Tensor],
    ) -> Mapping[str, torch.Tensor] | None:
        """Inspect or change `p.grad` in place, after the DDP all-reduce (every rank sees the same gradients).

        May return per-model tensors of shape [K]: the key "skip" (bool) skips that model's optimizer step;
        other keys are counters summed into the epoch's metrics as `<key>_steps`."""

    def before_step(
        self, params: Mapping[str, torch.Tensor], hp: HyperParams, lr: torch.Tensor, epoch: int, step: int,
        ctx: TrainContext, rng: StackedRNG, state: Mapping[str, torch.Tensor],
    ) -> None:
        """Change parameters in place right before the optimizer step; `lr` is the scheduled lr, shape [K]."""

    def after_step(
        self, params: Mapping[str, torch.Tensor], hp: HyperParams, lr: torch.Tensor, epoch: int, step: int,
        ctx: TrainContext, rng: StackedRNG, state: Mapping[str, torch.Tensor],
    ) -> None:
        """Change parameters (constraints) or `state` (weight averages) in place right after the optimizer
        step; `lr` is the scheduled lr, shape [K]. A model whose step was skipped gets both back afterwards."""

    def eval_params(
        self, params: Mapping[str, torch.Tensor], hp: HyperParams, ctx: TrainContext,
        state: Mapping[str, torch.Tensor],
    ) -> Mapping[str, torch.Tensor] | None:
        """Choose the weights that validation and test evaluate (an EMA or SWA average): return tensors shaped
        like `params` (any subset of the names), or None for the trained weights. Training continues from the
        trained weights."""


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


class PluginError(InputError, ValueError):
    """A plugin was refused at registration; names the plugin, the hook and the argument where they apply."""

    def __init__(self, plugin: str, reason: str, hook: str | None = None, argument: str | None = None):
        self.plugin, self.reason, self.hook, self.argument = plugin, reason, hook, argument
        where = f"plugin {plugin!r}" + (f", hook {hook!r}" if hook else "") + (
            f", argument {argument!r}" if argument else ""
        )
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        return (type(self), (self.plugin, self.reason, self.hook, self.argument))


class HookError(L2ClusterError, RuntimeError):
    """A plugin hook raised or returned something unusable while training; the job fails with this text.

    `trace` is the traceback of the plugin's exception (its own frames, file:line), shown under the message."""

    def __init__(self, plugin: str, hook: str, message: str, trace: str = ""):
        self.plugin, self.hook, self.message, self.trace = plugin, hook, message, trace
        text = f"plugin {plugin!r}, hook {hook!r}: {message}"
        if trace:
            text += "\nTraceback (the plugin's frames, most recent call last):\n" + trace
        super().__init__(text)

    def __reduce__(self):
        return (type(self), (self.plugin, self.hook, self.message, self.trace))


class HyperParams:
    """A plugin's config for K stacked models: numbers as tensors [K] (lists of numbers as [K, L]), other
    values as the one value the K models share. Read fields as attributes: `hp.strength`."""

    def __init__(self, configs: Sequence[BaseModel], *, dtype: torch.dtype, device: torch.device | str):
        if not configs:
            raise ValueError("HyperParams needs at least one config")
        self._device = device
        self._double: dict[str, torch.Tensor] = {}
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

    def double(self, field: str) -> torch.Tensor:
        """A numeric field as float64 [K] straight from the config, for arithmetic that must match what Python
        computes on the number (1 − 0.999 in float32 is not float32(1 − 0.999))."""
        if field not in self._double:  # made once (on the first, eager steps): a CUDA graph cannot copy to the GPU
            self._double[field] = torch.tensor(self._raw[field], dtype=torch.float64, device=self._device)
        return self._double[field]

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
    """Random numbers with one independent, seeded stream per stacked model. Every draw has the model axis
    first ([K, …]) and row k comes from model k's stream, so a model draws the same numbers alone or stacked.
    Draws never read the device on the host, so they work under CUDA graphs."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def _fill(self, shape: tuple[int, ...], dtype: torch.dtype, draw: Callable) -> torch.Tensor:
        out = torch.empty((len(self.generators), *shape), dtype=dtype, device=self.device)
        if len(self.generators) == 1:  # the one row is the whole tensor
            return draw(out, self.generators[0])
        for row, gen in zip(out, self.generators):
            draw(row, gen)
        return out

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform [0, 1) numbers of shape [K, *shape]."""
        return self._fill(shape, dtype, lambda t, g: t.uniform_(generator=g))

    def normal(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal numbers of shape [K, *shape] (scale and shift them per model with hp tensors)."""
        return self._fill(shape, dtype, lambda t, g: t.normal_(generator=g))

    def permutation(self, n: int) -> torch.Tensor:
        """A random permutation of 0…n−1 per model: int64 [K, n]."""
        return self.rand(n).argsort(dim=1)

    def gamma(self, concentration: torch.Tensor | float, *shape: int, dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
        """Gamma(concentration, 1) numbers of shape [K, *shape]; `concentration` is a number or a per-model
        tensor [K] (an hp field).

        Marsaglia & Tsang's method (ACM TOMS 2000) on 16 candidates drawn at once, the first accepted one kept:
        no loop waits on the device. Each candidate is accepted with probability ≥ 0.95, so running out of them
        (then the mode is returned) has probability below 1e-20."""
        tries = 16
        a = torch.as_tensor(concentration, dtype=torch.float64, device=self.device)
        a = a.view(-1, *([1] * (len(shape) + 1))) if a.dim() else a  # [K, 1…, 1] against [K, *shape, tries]
        boost = a < 1  # Gamma(a) = Gamma(a + 1) · U^(1/a) for a < 1
        d = torch.where(boost, a + 1, a) - 1 / 3
        c = 1 / torch.sqrt(9 * d)
        z = self.normal(*shape, tries, dtype=torch.float64)
        u = self.rand(*shape, tries, dtype=torch.float64)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        first = torch.where(ok, torch.arange(tries, 0, -1, device=self.device), 0).argmax(-1, keepdim=True)
        x = (d * v).gather(-1, first).squeeze(-1)
        x = torch.where(ok.any(-1), x, d.squeeze(-1))
        a = a.squeeze(-1)
        boost_u = self.rand(*shape, dtype=torch.float64)
        x = torch.where(boost.squeeze(-1), x * boost_u ** (1 / a), x)
        return x.to(dtype)

    def beta(self, alpha: torch.Tensor | float, beta: torch.Tensor | float | None = None, *shape: int,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Beta(alpha, beta) numbers of shape [K, *shape] (beta defaults to alpha, as mixup draws it); alpha and
        beta are numbers or per-model tensors [K]."""
        x = self.gamma(alpha, *shape, dtype=torch.float64)
        y = self.gamma(alpha if beta is None else beta, *shape, dtype=torch.float64)
        return (x / (x + y)).to(dtype)

    def state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def set_state(self, states: Sequence[torch.Tensor]) -> None:
        for g, s in zip(self.generators, states):
            g.set_state(s)


def _norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖t_k‖₂ of each model's slice of each tensor: [len(tensors), K]. One fused call when K = 1."""
    if tensors[0].shape[0] == 1:
        return torch.stack(torch._foreach_norm(list(tensors))).unsqueeze(1)
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
