"""The plugin hooks of one stack: calls each plugin's hooks with what they take, checks what they return, and
reports to a watch (see nonfinite.py) what each hook did to the numbers.

The trainer calls one method per point of its step (`on_batch`, `on_activation`, `example_penalties`,
`penalties`, `on_gradients`, `before_step`, `after_step`) and `eval_params` when it evaluates. A hook that
raises or returns the wrong thing becomes a HookError naming the plugin, the hook and the fix.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from l2cluster.plugin import HookError, HyperParams, StackedRNG, TrainContext
from l2cluster.registry import PluginInfo, Registry
from l2cluster.spec.config import TrainConfig
from l2cluster.training.nonfinite import NoWatch, Watch

_HOOKS = ("on_batch", "on_activation", "example_penalty", "penalty", "on_gradients", "before_step", "after_step",
          "eval_params")


@dataclass
class Plugin:
    """One regularizer entry of the stack: the plugin, its config for the K models and its per-job state."""

    info: PluginInfo
    hp: HyperParams
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    metric: str | None = None  # "penalty_<name>" for plugins that add to the loss …
    row: int = -1  # … and its row in the trainer's per-epoch sums of what they added

    @property
    def name(self) -> str:
        return self.info.name


class Hooks:
    """The regularizer entries of `configs` (one stack) with their per-job state, and the calls into them."""

    def __init__(self, configs: Sequence[TrainConfig], registry: Registry, ctx: TrainContext,
                 params: dict[str, torch.nn.Parameter], rng: StackedRNG, shared_rng: StackedRNG,
                 step: Callable[[], int], num_layers: int):
        self.ctx, self.params, self.K = ctx, params, ctx.num_models
        self._param_list = list(params.values())  # the watch's view of them, made once (the dict never changes)
        self.num_layers = num_layers  # hidden layers of the model, offered to on_activation
        # Two random streams per model: this rank's own (activations: dropout), and one shared by the ranks for
        # what every rank must draw alike (the global batch's transforms, changes to the parameters).
        self.rng, self.shared_rng = rng, shared_rng
        self._step = step  # the trainer's step count, offered to hooks that take `step`
        self.watch: Watch = NoWatch()  # a NonFiniteProbe while an epoch is replayed to blame a plugin
        self.plugins: list[Plugin] = []
        for i, reg in enumerate(configs[0].regularizers):
            info = registry.get(reg.name)
            try:
                hp = HyperParams([c.regularizers[i] for c in configs], dtype=ctx.dtype, device=ctx.device)
            except ValueError as e:
                raise ValueError(f"regularizers[{i}] ({reg.name}): {e}") from None
            self.plugins.append(Plugin(info, hp))
        self.with_hook = {h: [p for p in self.plugins if h in p.info.hooks] for h in _HOOKS}
        self.wants_hidden = any("hidden" in p.info.hooks["example_penalty"].args
                                for p in self.with_hook["example_penalty"])
        self._hidden: list[torch.Tensor] | None = None  # hidden activations of the step, when a hook takes them
        self._init_state()
        # Plugins that add to the loss, each with its row in the trainer's per-epoch sums of what they added.
        self.loss_plugins = [p for p in self.plugins if p.metric]
        for row, plug in enumerate(self.loss_plugins):
            plug.row = row

    # -- set-up and state -----------------------------------------------------------------------------------
    def _init_state(self) -> None:
        """Name the loss metrics, and build each plugin's per-job state (init_state)."""
        names = [p.name for p in self.plugins]
        for i, plug in enumerate(self.plugins):
            if {"penalty", "example_penalty"} & set(plug.info.hooks):
                plug.metric = f"penalty_{plug.name}" + (f"_{i}" if names.count(plug.name) > 1 else "")
            takes_state = sorted(h for h, impl in plug.info.hooks.items() if "state" in impl.args)
            if "init_state" not in plug.info.hooks:
                if takes_state:
                    raise HookError(plug.name, takes_state[0], "takes `state` but the plugin has no init_state "
                                    "hook to create it; add init_state(params, hp, ctx) returning its tensors")
                continue
            with torch.no_grad():
                out = self.call(plug, "init_state")
            if not isinstance(out, dict) or not all(isinstance(k, str) for k in out):
                raise HookError(plug.name, "init_state", f"returned {describe(out)}; expected a dict of named "
                                                         "tensors")
            for key, t in out.items():
                if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != self.K:
                    raise HookError(plug.name, "init_state", f"state {key!r} is {describe(t)}; expected a tensor "
                                                             f"with the model axis first, shape ({self.K}, …)")
                if t.device.type != self.ctx.device.type:
                    raise HookError(plug.name, "init_state", f"state {key!r} is on {t.device}; create it on "
                                                             f"ctx.device ({self.ctx.device.type})")
            plug.state = {k: t.detach() for k, t in out.items()}

    def state_tensors(self) -> list[torch.Tensor]:
        """Every plugin's state tensors ([K, …]), in a fixed order."""
        return [t for plug in self.plugins for t in plug.state.values()]

    def state_dict(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v.detach().cpu().clone() for k, v in p.state.items()} for p in self.plugins]

    def load_state(self, saved: list[dict]) -> None:
        # In place: a captured CUDA graph keeps reading the same tensors.
        if len(saved) != len(self.plugins):
            raise ValueError(f"checkpoint holds state of {len(saved)} plugins, this trainer has {len(self.plugins)}")
        for plug, values in zip(self.plugins, saved):
            if set(values) != set(plug.state):
                raise ValueError(f"checkpoint's state of plugin {plug.name!r} has {sorted(values)}, the plugin "
                                 f"makes {sorted(plug.state)}")
            for key, t in plug.state.items():
                t.copy_(values[key])

    # -- calling a hook -------------------------------------------------------------------------------------
    def call(self, plug: Plugin, hook: str, ctx: TrainContext | None = None, **offered):
        """Call a plugin's hook with what it takes of the offered arguments (plus the ones every hook may take).
        An exception becomes a HookError that names the plugin and hook and keeps the plugin's traceback."""
        rng = self.rng if hook in ("on_activation", "example_penalty") else self.shared_rng
        offered = {"hp": plug.hp, "ctx": ctx or self.ctx, "rng": rng, "state": plug.state, "params": self.params,
                   "step": self._step(), **offered}
        try:
            return plug.info.hooks[hook](**offered)
        except HookError:
            raise
        except Exception as e:
            raise HookError(plug.name, hook, f"{type(e).__name__}: {e}", _plugin_trace(e)) from e

    def _check_kind(self, plug: Plugin, hook: str, out: torch.Tensor) -> None:
        device = self.ctx.device.type
        if not out.is_floating_point() or out.device.type != device:
            raise HookError(plug.name, hook, f"returned a {out.dtype} tensor on {out.device}; expected a "
                                             f"floating-point tensor on {device}")

    # -- the points of a step, in the order a step reaches them ---------------------------------------------
    def on_batch(self, x: torch.Tensor, targets: torch.Tensor, epoch: int, ctx: TrainContext):
        """The on_batch hooks, in order, on the global batch: inputs [K, B, 784], targets [K, B] or [K, B, C]."""
        for plug in self.with_hook["on_batch"]:
            out = self.call(plug, "on_batch", ctx=ctx, x=x, targets=targets, epoch=epoch)
            if out is None:
                continue
            if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
                raise HookError(plug.name, "on_batch", f"returned {describe(out)}; expected (x, targets) or None")
            new_x, new_t = out
            if new_x.shape != x.shape:
                raise HookError(plug.name, "on_batch", f"returned x of shape {tuple(new_x.shape)}; expected "
                                                       f"{tuple(x.shape)}")
            self._check_kind(plug, "on_batch", new_x)
            soft = (*targets.shape[:2], self.ctx.num_classes)
            if new_t.shape == targets.shape[:2] and not new_t.is_floating_point():
                pass  # class indices
            elif new_t.shape == soft and new_t.is_floating_point():
                new_t = new_t.to(x.dtype)
            else:
                raise HookError(plug.name, "on_batch", f"returned targets {describe(new_t)} ({new_t.dtype}); "
                                f"expected class indices {tuple(targets.shape[:2])} (int64) or probabilities {soft}")
            self.watch.made_nan(x, new_x, plug.name, "on_batch:returned NaN inputs from finite ones")
            x, targets = new_x, new_t
        return x, targets

    def forward_hook(self) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
        """What the model calls on each hidden layer's activations in this step's forward pass (None: nothing)."""
        self._hidden = [] if self.wants_hidden else None
        return self.on_activation if self.with_hook["on_activation"] or self.wants_hidden else None

    def on_activation(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        if self._hidden is not None:
            self._hidden.append(x)
        for plug in self.with_hook["on_activation"]:
            out = self.call(plug, "on_activation", x=x, layer=layer, num_layers=self.num_layers)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                raise HookError(plug.name, "on_activation",
                                f"returned {describe(out)}; expected a tensor of shape {tuple(x.shape)}")
            self._check_kind(plug, "on_activation", out)
            self.watch.made_nan(x, out, plug.name, "on_activation:returned NaN activations from finite inputs")
            x = out
        return x

    def example_penalties(self, logits: torch.Tensor, targets: torch.Tensor, epoch: int,
                          ctx: TrainContext) -> list[tuple[Plugin, torch.Tensor]]:
        """Each example_penalty hook's term per model and example [K, local batch], with its plugin."""
        terms = []
        for plug in self.with_hook["example_penalty"]:
            out = self.call(plug, "example_penalty", ctx=ctx, logits=logits, targets=targets,
                            hidden=tuple(self._hidden or ()), epoch=epoch)
            if not isinstance(out, torch.Tensor) or out.shape != logits.shape[:2]:
                raise HookError(plug.name, "example_penalty", f"returned {describe(out)}; expected a tensor of "
                                f"shape {tuple(logits.shape[:2])}, one value per model and example")
            self._check_kind(plug, "example_penalty", out)
            self.watch.made_nan(logits, out, plug.name, "example_penalty:returned NaN from finite logits")
            terms.append((plug, out))
        self._hidden = None
        return terms

    def penalties(self, epoch: int, ctx: TrainContext) -> list[tuple[Plugin, torch.Tensor]]:
        """Each penalty hook's term per model [K], with its plugin."""
        terms = []
        for plug in self.with_hook["penalty"]:
            out = self.call(plug, "penalty", ctx=ctx, epoch=epoch)
            if not isinstance(out, torch.Tensor) or out.shape != (self.K,):
                raise HookError(plug.name, "penalty",
                                f"returned {describe(out)}; expected a tensor of shape ({self.K},), one per model")
            self._check_kind(plug, "penalty", out)
            self.watch.made_nan(self._param_list, out, plug.name,
                                "penalty:returned NaN from finite parameters")
            terms.append((plug, out))
        return terms

    def on_gradients(self, grads: list[torch.Tensor], epoch: int, ctx: TrainContext,
                     counters: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The on_gradients hooks, in order. Adds what they count to `counters` ([K] each) and returns the models
        whose step they skip ([K] bool), or None when no hook asked for a skip."""
        skip = None
        for plug in self.with_hook["on_gradients"]:
            with self.watch.in_place(plug.name, "on_gradients", {"gradients": grads, "parameters": self._param_list}):
                out = self.call(plug, "on_gradients", ctx=ctx, epoch=epoch)
            for key, value in (out or {}).items():
                if not isinstance(value, torch.Tensor) or value.shape != (self.K,):
                    raise HookError(plug.name, "on_gradients",
                                    f"returned {key!r}: {describe(value)}; expected shape ({self.K},)")
                if key == "skip":
                    skip = value.bool() if skip is None else skip | value.bool()
                elif key in counters:
                    counters[key] += value.to(torch.float64)
                else:
                    counters[key] = value.to(torch.float64)
        return skip

    def before_step(self, lr: torch.Tensor, epoch: int, ctx: TrainContext) -> None:
        for plug in self.with_hook["before_step"]:
            with self.watch.in_place(plug.name, "before_step", {"parameters": self._param_list}):
                self.call(plug, "before_step", ctx=ctx, lr=lr, epoch=epoch)

    def after_step(self, lr: torch.Tensor, epoch: int, ctx: TrainContext) -> None:
        for plug in self.with_hook["after_step"]:
            with self.watch.in_place(plug.name, "after_step", {"parameters": self._param_list}, only_stepped=True):
                self.call(plug, "after_step", ctx=ctx, lr=lr, epoch=epoch)

    def eval_params(self) -> dict[str, torch.Tensor] | None:
        """The weights evaluation uses: the trained ones, unless an eval_params hook chooses others (EMA)."""
        if not self.with_hook["eval_params"]:
            return None
        chosen: dict[str, torch.Tensor] = dict(self.params)
        for plug in self.with_hook["eval_params"]:
            out = self.call(plug, "eval_params", params=chosen)
            if out is None:
                continue
            for name, t in dict(out).items():
                if name not in chosen or not isinstance(t, torch.Tensor) or t.shape != chosen[name].shape:
                    expected = tuple(chosen[name].shape) if name in chosen else f"one of {', '.join(chosen)}"
                    raise HookError(plug.name, "eval_params", f"returned {name!r}: {describe(t)}; expected "
                                                              f"{expected}")
                chosen[name] = t
        return chosen


def _plugin_trace(e: BaseException, limit: int = 6) -> str:
    """The traceback of an exception raised inside a hook, without l2cluster's own frames: where in the plugin
    (file:line) it went wrong."""
    frames = list(traceback.extract_tb(e.__traceback__))
    while frames and frames[0].filename == __file__:  # drop the frames that called the hook
        frames.pop(0)
    frames = [f for f in frames if not f.filename.endswith("l2cluster/registry.py")][-limit:]
    return "".join(traceback.format_list(frames)).rstrip()


def describe(value) -> str:
    """A value as an error message names it: a tensor by its shape, anything else by its type and repr."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:120]
