"""The trainer: trains K stacked jobs (K = 1 for an ordinary job) on MNIST tensors, calling the plugin hooks.

Plain PyTorch — it never imports ray. Data lives as tensors on the training device; each step gathers a batch
by index from a per-epoch permutation derived from the job seed (no per-sample DataLoader). Works inside an
initialised torch.distributed process group: every rank draws the same global batch and takes its shard.

One step:  on_batch → forward (on_activation) → cross-entropy + example_penalty + penalty → backward
           → all-reduce (DDP) → on_gradients → before_step → optimizer step → after_step
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from l2cluster.config import TrainConfig
from l2cluster.data import Splits
from l2cluster.model import StackedMLP
from l2cluster.packing import stack_key
from l2cluster.plugin import HookError, HyperParams, StackedRNG, TrainContext, per_model_norm
from l2cluster.registry import PluginInfo, Registry

_EVAL_ROWS = 65536  # examples × models per evaluation chunk: bounds the activations' memory at any K
_NONFINITE_CHECK_EVERY = 50  # steps between divergence checks in one process (each check is a device sync)


@dataclass
class RunResult:
    """What one job's training produced: per-epoch metrics and the final numbers."""

    outcome: str  # "succeeded" | "diverged" | "failed"
    epochs: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    diverged_epoch: int | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def derive_seed(seed: int, purpose: str, rank: int = 0) -> int:
    """Independent 63-bit seeds for initialisation, batch order and dropout, from one job seed."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resolve_device(use_gpu: str | bool) -> torch.device:
    if use_gpu == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if use_gpu:
        if not torch.cuda.is_available():
            raise ValueError("scaling.use_gpu is true but no CUDA GPU is visible; set use_gpu: auto or false")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class _Plugin:
    """One regularizer entry of the stack: the plugin, its config for the K models and its per-job state."""

    info: PluginInfo
    hp: HyperParams
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    metric: str | None = None  # "penalty_<name>" for plugins that add to the loss …
    row: int = -1  # … and its row in the trainer's per-epoch sums of what they added

    @property
    def name(self) -> str:
        return self.info.name


_HOOKS = ("on_batch", "on_activation", "example_penalty", "penalty", "on_gradients", "before_step", "after_step",
          "eval_params")


def pack_key(config: TrainConfig) -> str:
    """Jobs with equal keys can be trained stacked: they differ only in seed and numeric plugin settings."""
    return stack_key(config.model_dump(mode="json"))


class Trainer:
    """Trains `configs` (TrainConfigs that share a pack_key) as one stacked model."""

    def __init__(self, configs: Sequence[TrainConfig], splits: Splits, registry: Registry, *,
                 device: torch.device | str | None = None, cuda_graphs: bool | None = None):
        if not configs:
            raise ValueError("Trainer needs at least one config")
        keys = {pack_key(c) for c in configs}
        if len(keys) != 1:
            raise ValueError("configs trained together must differ only in seed and numeric regularizer settings")
        self.configs = list(configs)
        self.K = K = len(configs)
        cfg = self.cfg = configs[0]
        if K > 1 and cfg.schedule.name == "plateau":
            raise ValueError("a plateau schedule follows one model's validation loss; train such jobs one at a time")
        self.device = torch.device(device) if device is not None else resolve_device(cfg.scaling.use_gpu)
        self.dtype = torch.float64 if cfg.model.dtype == "float64" else torch.float32
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1

        self.train_x, self.train_y = self._features(splits.train_images), self._labels(splits.train_labels)
        self.val_x, self.val_y = self._features(splits.val_images), self._labels(splits.val_labels)
        self.test_x, self.test_y = self._features(splits.test_images), self._labels(splits.test_labels)

        seeds = [c.seed for c in configs]
        self.model = StackedMLP(K, cfg.model.hidden_sizes, activation=cfg.model.activation,
                                dtype=self.dtype, device=self.device)
        self.model.reset_parameters([derive_seed(s, "init") for s in seeds])
        self.params: dict[str, torch.nn.Parameter] = dict(self.model.named_parameters())
        # Every rank draws the same permutation (the global batch), then takes its shard.
        self.order_gens = [torch.Generator().manual_seed(derive_seed(s, "order")) for s in seeds]
        # Two random streams per model: this rank's own (activations: dropout), and one shared by the ranks for
        # what every rank must draw alike (the global batch's transforms, changes to the parameters).
        self.rng = StackedRNG([derive_seed(s, "dropout", self.rank) for s in seeds], self.device)
        self.shared_rng = StackedRNG([derive_seed(s, "shared") for s in seeds], self.device)
        self.graphs = False  # decided below, once the plugins are known
        n_train, batch = len(self.train_y), cfg.data.batch_size
        self.ctx = TrainContext(
            num_models=K, world_size=self.world, rank=self.rank, global_batch=batch,
            local_batch=len(range(self.rank, batch, self.world)), steps_per_epoch=math.ceil(n_train / batch),
            train_size=n_train, num_classes=self.model.num_classes, device=self.device, dtype=self.dtype)

        self.plugins: list[_Plugin] = []
        for i, reg in enumerate(cfg.regularizers):
            info = registry.get(reg.name)
            try:
                hp = HyperParams([c.regularizers[i] for c in configs], dtype=self.dtype, device=self.device)
            except ValueError as e:
                raise ValueError(f"regularizers[{i}] ({reg.name}): {e}") from None
            self.plugins.append(_Plugin(info, hp))
        self._with = {h: [p for p in self.plugins if h in p.info.hooks] for h in _HOOKS}
        # Why this trainer replays no CUDA graph (None while it does): for the job's log.
        self.graphs_off_reason = (self._graphs_off_reason() if cuda_graphs is not False
                                  else "turned off by the caller (cuda_graphs=False)")
        self.graphs = self.graphs_off_reason is None
        # A gradient hook may skip some models' steps. Where reading that mask is free (CPU) the host decides;
        # on a GPU it would wait for the device every step (and cannot be captured), so the skipped models are
        # put back by a device-side mask instead (see _snapshot_whole).
        self._skip_on_host = self.device.type != "cuda"
        if self.device.type == "cuda":
            # cuBLAS and cuDNN read process-wide flags: set them for this run (a worker trains one stack at a
            # time). Both always, as cuDNN's default is on.
            torch.backends.cuda.matmul.allow_tf32 = cfg.model.tf32
            torch.backends.cudnn.allow_tf32 = cfg.model.tf32
        # Under CUDA graphs the optimizer's step count and lr live on the device (capturable), so one captured
        # step serves every step and every scheduled lr.
        self.optimizer = build_optimizer(cfg.optimizer, list(self.params.values()), capturable=self.graphs)
        self.scheduler = build_scheduler(cfg.schedule, self.optimizer, cfg.epochs)
        self._lr_tensor = self.optimizer.param_groups[0]["lr"]
        self._lr_k = torch.zeros(K, dtype=self.dtype, device=self.device)
        self._sums = torch.zeros(4, K, dtype=torch.float64, device=self.device)
        self._counters = {k: torch.zeros(K, dtype=torch.float64, device=self.device) for k in ("clipped", "skipped")}
        self._graph: torch.cuda.CUDAGraph | None = None
        self._hidden: list[torch.Tensor] | None = None  # hidden activations of the step, when a hook takes them
        self._wants_hidden = any("hidden" in p.info.hooks["example_penalty"].args
                                 for p in self._with["example_penalty"])
        self._probe: _NonFiniteProbe | None = None  # set only while an epoch is replayed to blame a plugin
        self.graph_error: str | None = None
        self.hook_error: HookError | None = None  # set when a hook raised and failed the whole stack
        self._graph_idx: torch.Tensor | None = None
        self._eager_steps_before_capture = 3
        # Progress, all of it in state_dict(): a run resumed from a checkpoint continues exactly.
        self.step_count = 0
        self.epochs_done = 0
        self.train_s = 0.0
        self.alive = torch.ones(K, dtype=torch.bool)
        self.best: list[tuple[float, int]] = [(-1.0, 0)] * K
        self.results = [RunResult("running") for _ in range(K)]
        self._init_plugins()
        # Per plugin that adds to the loss: the sum over the epoch's steps of what it added, per model.
        self._loss_plugins = [p for p in self.plugins if p.metric]
        for row, plug in enumerate(self._loss_plugins):
            plug.row = row
        self._penalties = torch.zeros(len(self._loss_plugins), K, dtype=torch.float64, device=self.device)

    # -- set-up helpers -------------------------------------------------------------------------------------
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        # ToTensor's scaling: pixels / 255 in [0, 1], flattened to 784 (the article's loop forgot to flatten).
        return images.reshape(len(images), -1).to(self.device).to(self.dtype).div_(255)

    def _labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.to(device=self.device, dtype=torch.long)

    # -- hooks ----------------------------------------------------------------------------------------------
    def _init_plugins(self) -> None:
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
                out = self._call(plug, "init_state")
            if not isinstance(out, dict) or not all(isinstance(k, str) for k in out):
                raise HookError(plug.name, "init_state", f"returned {_describe(out)}; expected a dict of named "
                                                         "tensors")
            for key, t in out.items():
                if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != self.K:
                    raise HookError(plug.name, "init_state", f"state {key!r} is {_describe(t)}; expected a tensor "
                                                             f"with the model axis first, shape ({self.K}, …)")
                if t.device.type != self.device.type:
                    raise HookError(plug.name, "init_state", f"state {key!r} is on {t.device}; create it on "
                                                             f"ctx.device ({self.device.type})")
            plug.state = {k: t.detach() for k, t in out.items()}

    def _call(self, plug: _Plugin, hook: str, ctx: TrainContext | None = None, **offered):
        """Call a plugin's hook with what it takes of the offered arguments (plus the ones every hook may take).
        An exception becomes a HookError that names the plugin and hook and keeps the plugin's traceback."""
        rng = self.rng if hook in ("on_activation", "example_penalty") else self.shared_rng
        offered = {"hp": plug.hp, "ctx": ctx or self.ctx, "rng": rng, "state": plug.state, "params": self.params,
                   "step": self.step_count, **offered}
        try:
            return plug.info.hooks[hook](**offered)
        except HookError:
            raise
        except Exception as e:
            raise HookError(plug.name, hook, f"{type(e).__name__}: {e}", _plugin_trace(e)) from e

    def _activation(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        if self._hidden is not None:
            self._hidden.append(x)
        for plug in self._with["on_activation"]:
            out = self._call(plug, "on_activation", x=x, layer=layer, num_layers=self.model.num_hidden)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                raise HookError(plug.name, "on_activation",
                                f"returned {_describe(out)}; expected a tensor of shape {tuple(x.shape)}")
            self._check_kind(plug, "on_activation", out)
            if self._probe is not None:
                self._probe.saw(_finite(x) & _nan(out), plug.name, "on_activation:returned NaN activations from "
                                                                   "finite inputs")
            x = out
        return x

    def _batch(self, x: torch.Tensor, targets: torch.Tensor, epoch: int, ctx: TrainContext):
        """The on_batch hooks, in order, on the global batch: inputs [K, B, 784], targets [K, B] or [K, B, C]."""
        for plug in self._with["on_batch"]:
            out = self._call(plug, "on_batch", ctx=ctx, x=x, targets=targets, epoch=epoch)
            if out is None:
                continue
            if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
                raise HookError(plug.name, "on_batch", f"returned {_describe(out)}; expected (x, targets) or None")
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
                raise HookError(plug.name, "on_batch", f"returned targets {_describe(new_t)} ({new_t.dtype}); "
                                f"expected class indices {tuple(targets.shape[:2])} (int64) or probabilities {soft}")
            if self._probe is not None:
                self._probe.saw(_finite(x) & _nan(new_x), plug.name, "on_batch:returned NaN inputs from finite ones")
            x, targets = new_x, new_t
        return x, targets

    def _example_terms(self, logits, targets, epoch: int, ctx: TrainContext) -> list[tuple[_Plugin, torch.Tensor]]:
        terms = []
        for plug in self._with["example_penalty"]:
            out = self._call(plug, "example_penalty", ctx=ctx, logits=logits, targets=targets,
                             hidden=tuple(self._hidden or ()), epoch=epoch)
            if not isinstance(out, torch.Tensor) or out.shape != logits.shape[:2]:
                raise HookError(plug.name, "example_penalty", f"returned {_describe(out)}; expected a tensor of "
                                f"shape {tuple(logits.shape[:2])}, one value per model and example")
            self._check_kind(plug, "example_penalty", out)
            if self._probe is not None:
                self._probe.saw(_finite(logits) & _nan(out), plug.name,
                                "example_penalty:returned NaN from finite logits")
            terms.append((plug, out))
        return terms

    def _penalty(self, epoch: int, ctx: TrainContext) -> list[tuple[_Plugin, torch.Tensor]]:
        terms = []
        for plug in self._with["penalty"]:
            out = self._call(plug, "penalty", ctx=ctx, epoch=epoch)
            if not isinstance(out, torch.Tensor) or out.shape != (self.K,):
                raise HookError(plug.name, "penalty",
                                f"returned {_describe(out)}; expected a tensor of shape ({self.K},), one per model")
            self._check_kind(plug, "penalty", out)
            if self._probe is not None:
                self._probe.saw(_all_finite(self.params.values()) & _nan(out), plug.name,
                                "penalty:returned NaN from finite parameters")
            terms.append((plug, out))
        return terms

    def _check_kind(self, plug: _Plugin, hook: str, out: torch.Tensor) -> None:
        if not out.is_floating_point() or out.device.type != self.device.type:
            raise HookError(plug.name, hook, f"returned a {out.dtype} tensor on {out.device}; expected a "
                                             f"floating-point tensor on {self.device.type}")

    def _eval_params(self) -> dict[str, torch.Tensor] | None:
        """The weights evaluation uses: the trained ones, unless an eval_params hook chooses others (EMA)."""
        if not self._with["eval_params"]:
            return None
        chosen: dict[str, torch.Tensor] = dict(self.params)
        for plug in self._with["eval_params"]:
            out = self._call(plug, "eval_params", params=chosen)
            if out is None:
                continue
            for name, t in dict(out).items():
                if name not in chosen or not isinstance(t, torch.Tensor) or t.shape != chosen[name].shape:
                    expected = tuple(chosen[name].shape) if name in chosen else f"one of {', '.join(chosen)}"
                    raise HookError(plug.name, "eval_params", f"returned {name!r}: {_describe(t)}; expected "
                                                              f"{expected}")
                chosen[name] = t
        return chosen

    # -- the loop -------------------------------------------------------------------------------------------
    def fit(
        self,
        on_epoch: Callable[[int, list[dict]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, int, int], None] | None = None,
    ) -> list[RunResult]:
        """Train every model for the remaining epochs; returns one RunResult per model.

        `on_epoch(epoch, metrics)` runs after every epoch (a checkpoint taken there with state_dict() resumes
        exactly). `should_stop()` is asked before every step: True ends the run at once with outcome
        "cancelled"; a collection of model indices ends just those models ("cancelled") while the others go on
        (under DDP every rank must get the same answer at the same step). `on_step(epoch, step, num_steps)` runs
        after every step (live progress; it must be cheap and must not read the device).
        A plugin hook that raises fails every model of the stack (outcome "failed", the plugin's message; the
        error is kept in `hook_error`); a non-finite loss ends that model with outcome "diverged" and the epoch
        it happened."""
        results = self.results
        try:
            cancelled = self._fit(results, on_epoch, should_stop, on_step)
        except HookError as e:
            self.hook_error = e
            for r in results:
                if r.outcome == "running":
                    r.outcome, r.error = "failed", str(e)
            return results
        for r in results:
            if r.outcome == "running":
                r.outcome = "cancelled" if cancelled else "succeeded"
        return results

    def _fit(self, results: list[RunResult], on_epoch, should_stop, on_step=None) -> bool:
        cfg, K, dev = self.cfg, self.K, self.device
        n, batch = len(self.train_y), cfg.data.batch_size
        num_steps = math.ceil(n / batch)
        alive, best = self.alive, self.best
        t_start = time.perf_counter() - self.train_s
        for epoch in range(self.epochs_done + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            steps_before = self.step_count
            self.model.train()
            # Where the epoch starts, so that a non-finite loss can be traced to the plugin that caused it by
            # replaying the epoch (a copy of parameters and optimizer state: milliseconds per epoch).
            epoch_start = self._capture() if self.plugins else None
            order = torch.stack([torch.randperm(n, generator=g) for g in self.order_gens]).to(dev)
            lr = float(self.optimizer.param_groups[0]["lr"])
            lr_k = self._lr_k.fill_(lr)
            # Per-model sums, kept on the device so the loop never waits for it:
            # rows = CE loss sum, correct, objective (loss + penalty) sum, grad-norm sum.
            sums = self._sums.zero_()
            self._penalties.zero_()
            counters = self._counters
            for c in counters.values():
                c.zero_()
            for s in range(num_steps):
                stop = should_stop() if should_stop is not None else False
                if stop and (stop is True or not self.stop_models(stop)):
                    return True
                global_idx = order[:, s * batch:(s + 1) * batch]
                if self.graphs and global_idx.shape[1] == batch:
                    self._graph_step(global_idx, epoch)
                else:
                    self._step(global_idx, epoch, lr_k, sums, counters)
                if on_step is not None:
                    on_step(epoch, s + 1, num_steps)
                check = self.world == 1 and s % _NONFINITE_CHECK_EVERY == _NONFINITE_CHECK_EVERY - 1
                if check and not bool(torch.isfinite(sums[2].cpu())[alive].any()):
                    break  # every live model has diverged: no point finishing the epoch
            if self.distributed:
                # One collective for the epoch's metrics. Grad norms and hook counters need none: every rank
                # saw the same all-reduced gradients.
                dist.all_reduce(sums[:3])
                if len(self._penalties):  # each rank added its share of the loss terms
                    dist.all_reduce(self._penalties)
            val_loss, val_acc = self.evaluate(self.val_x, self.val_y)
            epoch_s = time.perf_counter() - t0
            sums_cpu, counts = sums.cpu(), {k: v.cpu() for k, v in counters.items()}
            steps_run = max(1, self.step_count - steps_before)
            penalties = (self._penalties / steps_run).cpu()
            wnorm = self.weight_norms().cpu()
            nonfinite = [k for k in range(K) if alive[k] and not (
                math.isfinite(float(sums_cpu[2, k])) and math.isfinite(float(val_loss[k])))]
            blamed = {}
            if nonfinite and epoch_start is not None:
                blamed = self._blame(epoch, order, epoch_start, self.step_count - steps_before, nonfinite)
            epoch_metrics: list[dict] = []
            for k in range(K):
                if not alive[k]:
                    epoch_metrics.append({})
                    continue
                # type-check: an empty dict literal in a conditional expression
                m = {  # type: ignore[misc]
                    "epoch": epoch,
                    "train_loss": float(sums_cpu[0, k] / n),
                    "train_acc": float(sums_cpu[1, k] / n),
                    "val_loss": float(val_loss[k]),
                    "val_acc": float(val_acc[k]),
                    "lr": lr,
                    "weight_norm": float(wnorm[k]),
                    "grad_norm": float(sums_cpu[3, k] / steps_run),
                    "clipped_steps": int(counts["clipped"][k]),
                    "skipped_steps": int(counts["skipped"][k]),
                    **{f"{key}_steps": int(v[k]) for key, v in counts.items() if key not in ("clipped", "skipped")},
                    **{p.metric: float(penalties[row, k]) for row, p in enumerate(self._loss_plugins)},
                    "epoch_s": epoch_s,
                }
                results[k].epochs.append(m)
                if k in blamed:  # a plugin made the numbers non-finite: its error, not a divergence
                    alive[k] = False
                    results[k].outcome, results[k].error = "failed", blamed[k]
                elif k in nonfinite:
                    alive[k] = False
                    results[k].outcome, results[k].diverged_epoch = "diverged", epoch
                    results[k].error = f"loss became non-finite in epoch {epoch}"
                elif m["val_acc"] > best[k][0]:
                    best[k] = (m["val_acc"], epoch)
                epoch_metrics.append(m)
            self._schedule(val_loss, alive)
            self.epochs_done = epoch
            self.train_s = time.perf_counter() - t_start
            if on_epoch is not None:
                on_epoch(epoch, epoch_metrics)
            if not alive.any():
                break
        test_loss, test_acc = self.evaluate(self.test_x, self.test_y)
        self.train_s = time.perf_counter() - t_start
        for k in range(K):
            if alive[k]:
                self.finalize(k, float(test_loss[k]), float(test_acc[k]))
            elif not results[k].final:
                self.finalize(k)
        return False

    def stop_models(self, models) -> bool:
        """End these models now with outcome "cancelled" (the others train on); False when none is left."""
        for k in models:
            if self.alive[k]:
                self.alive[k] = False
                self.results[k].outcome = "cancelled"
                self.finalize(k)
        return bool(self.alive.any())

    def finalize(self, k: int, test_loss: float | None = None, test_acc: float | None = None) -> dict:
        """Model k's final numbers: its last epoch's metrics, best validation accuracy and, for a model that
        trained to the end, its test metrics (None for one that ended early)."""
        r = self.results[k]
        last = r.epochs[-1] if r.epochs else {}
        best_acc, best_epoch = self.best[k]
        r.final = {key: last.get(key) for key in ("train_loss", "train_acc", "val_loss", "val_acc", "weight_norm")}
        r.final.update(best_val_acc=best_acc if best_epoch else None, best_epoch=best_epoch or None,
                       epochs_run=len(r.epochs), train_s=self.train_s, test_loss=test_loss, test_acc=test_acc)
        return r.final

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly: parameters, optimizer and scheduler state, the random
        streams (batch order, and this rank's dropout), and the progress and metrics so far. Call it between
        epochs (from `on_epoch`); save it with torch.save."""
        return {
            "format": 1,
            "epochs_done": self.epochs_done,
            "step_count": self.step_count,
            "train_s": self.train_s,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "order_rng": [g.get_state() for g in self.order_gens],
            "dropout_rng": self.rng.state(),
            "shared_rng": self.shared_rng.state(),
            "plugin_state": [{k: v.detach().cpu().clone() for k, v in p.state.items()} for p in self.plugins],
            "alive": self.alive.clone(),
            "best": list(self.best),
            "results": [r.to_dict() for r in self.results],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() of a trainer built from the same configs."""
        if state.get("format") != 1:
            raise ValueError(f"unknown checkpoint format {state.get('format')!r}; expected 1")
        if len(state["results"]) != self.K:
            raise ValueError(f"checkpoint holds {len(state['results'])} models, this trainer {self.K}")
        self.model.load_state_dict(state["model"])
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if isinstance(lr, torch.Tensor):  # capturable: the CUDA graph reads this device tensor; refill it
                group["lr"] = lr.copy_(torch.as_tensor(group["lr"]))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for g, s in zip(self.order_gens, state["order_rng"]):
            g.set_state(s)
        self.rng.set_state(state["dropout_rng"])
        if "shared_rng" in state:  # absent from checkpoints written before it existed (nothing drew from it)
            self.shared_rng.set_state(state["shared_rng"])
        self._load_plugin_state(state.get("plugin_state") or [{} for _ in self.plugins])
        self.epochs_done, self.step_count, self.train_s = state["epochs_done"], state["step_count"], state["train_s"]
        self.alive = state["alive"].clone()
        self.best = [tuple(b) for b in state["best"]]
        self.results = [RunResult(**r) for r in state["results"]]

    def _load_plugin_state(self, saved: list[dict]) -> None:
        # In place: a captured CUDA graph keeps reading the same tensors.
        if len(saved) != len(self.plugins):
            raise ValueError(f"checkpoint holds state of {len(saved)} plugins, this trainer has {len(self.plugins)}")
        for plug, values in zip(self.plugins, saved):
            if set(values) != set(plug.state):
                raise ValueError(f"checkpoint's state of plugin {plug.name!r} has {sorted(values)}, the plugin "
                                 f"makes {sorted(plug.state)}")
            for key, t in plug.state.items():
                t.copy_(values[key])

    # -- blaming a plugin for non-finite numbers -------------------------------------------------------------
    def _capture(self) -> dict:
        """Copies of what one epoch's steps change: parameters, optimizer state, dropout streams, step count."""
        return {
            "params": [p.detach().clone() for p in self.params.values()],
            "optimizer": [{k: v.clone() if isinstance(v, torch.Tensor) else v
                           for k, v in self.optimizer.state.get(p, {}).items()} for p in self.params.values()],
            "dropout_rng": self.rng.state(),
            "shared_rng": self.shared_rng.state(),
            "plugin_state": [{k: v.clone() for k, v in p.state.items()} for p in self.plugins],
            "step_count": self.step_count,
        }

    def _restore_capture(self, saved: dict) -> None:
        # In place: a captured CUDA graph keeps reading the same tensors.
        for p, value, state in zip(self.params.values(), saved["params"], saved["optimizer"]):
            p.detach().copy_(value)
            current = self.optimizer.state.get(p, {})
            for key, v in current.items():
                if key in state:
                    if isinstance(v, torch.Tensor):
                        v.copy_(state[key])
                    else:
                        current[key] = state[key]
                elif isinstance(v, torch.Tensor):  # not there yet at the capture: zero is a fresh state
                    v.zero_()
        self.rng.set_state(saved["dropout_rng"])
        self.shared_rng.set_state(saved["shared_rng"])
        self._load_plugin_state(saved["plugin_state"])
        self.step_count = saved["step_count"]

    def _blame(self, epoch: int, order: torch.Tensor, epoch_start: dict, steps: int,
               models: list[int]) -> dict[int, str]:
        """The loss of `models` became non-finite in this epoch: replay the epoch's `steps` from its start, checking
        after every hook, and return {model: error} for those whose numbers a plugin hook made non-finite from
        finite ones. Models whose own numbers overflowed (a real divergence) are not in the result; neither are
        those the replay does not reproduce. Costs at most one more epoch, and only when something diverged."""
        batch = self.cfg.data.batch_size
        now = self._capture()
        probe = self._probe = _NonFiniteProbe(self.K, self.device)
        sums = torch.zeros_like(self._sums)
        counters = {k: torch.zeros_like(v) for k, v in self._counters.items()}
        lr_k = self._lr_k
        try:
            self._restore_capture(epoch_start)
            for s in range(steps):
                probe.start_step(s)
                self._step(order[:, s * batch:(s + 1) * batch], epoch, lr_k, sums, counters)
                if self.distributed:  # every rank must replay the same steps; the earliest event wins
                    dist.all_reduce(probe.first, op=dist.ReduceOp.MIN)
                if bool((probe.first[models] < _NO_EVENT).all()):
                    break
        finally:
            self._probe = None
            self._restore_capture(now)
        return probe.errors(models, epoch)

    # -- CUDA graphs ----------------------------------------------------------------------------------------
    def _graphs_off_reason(self) -> str | None:
        """One job is bound by kernel launches on a GPU (~110 per step); replaying a captured step removes them.
        Possible on CUDA in one process when no hook takes `epoch` or `step` (their values would be frozen into
        the graph). Returns why not, or None. A hook that reads device values on the host fails the capture
        instead (_graph_step), and that reason replaces this one."""
        if self.device.type != "cuda":
            return f"not on a CUDA device ({self.device.type})"
        if self.world != 1:
            return f"DDP with {self.world} processes (the all-reduce runs between steps)"
        for plug in self.plugins:
            for name, h in plug.info.hooks.items():
                frozen = sorted({"epoch", "step"} & set(h.args))
                if frozen and name not in ("init_state", "eval_params"):  # these run outside the step
                    return f"plugin {plug.name!r}, hook {name!r} takes {' and '.join(frozen)} (a graph would freeze it)"
        return None

    def _graph_step(self, idx: torch.Tensor, epoch: int) -> None:
        if self._graph is None and self._eager_steps_before_capture > 0:
            # Capture needs a few real steps first (optimizer state, cuBLAS workspaces), on a side stream.
            self._eager_steps_before_capture -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(idx, epoch, self._lr_k, self._sums, self._counters)
            torch.cuda.current_stream().wait_stream(side)
            return
        if self._graph is None:
            self._graph_idx = idx.clone()
            graph = torch.cuda.CUDAGraph()
            # Random draws (dropout, batch transforms) advance with every replay, as they would eagerly.
            for gen in self.rng.generators + self.shared_rng.generators:
                graph.register_generator_state(gen)
            self.optimizer.zero_grad(set_to_none=True)
            steps = self.step_count
            try:
                with torch.cuda.graph(graph):
                    self._step(self._graph_idx, epoch, self._lr_k, self._sums, self._counters)
            except RuntimeError as e:  # something in the step cannot be captured: train eagerly instead
                self.graphs, self.graph_error, self.step_count = False, f"{type(e).__name__}: {e}", steps
                self.graphs_off_reason = f"capture failed: {self.graph_error}"
                torch.cuda.synchronize()
                self._step(idx, epoch, self._lr_k, self._sums, self._counters)
                return
            self.step_count = steps  # capturing recorded the step without running it; the replay runs it
            self._graph = graph
        # type-check: made when the CUDA graph was captured, before any replay
        self._graph_idx.copy_(idx)  # type: ignore[union-attr]
        self._graph.replay()
        self.step_count += 1

    def _step(self, global_idx: torch.Tensor, epoch: int, lr_k, sums, counters) -> None:
        """One optimizer step on the global batch `global_idx` [K, B] (this rank trains on its shard of it)."""
        K, world = self.K, self.world
        global_batch = global_idx.shape[1]
        ctx = self.ctx
        if global_batch != ctx.global_batch:  # the epoch's last, smaller batch
            ctx = dataclasses.replace(ctx, global_batch=global_batch,
                                      local_batch=len(range(self.rank, global_batch, world)))
        if self._with["on_batch"]:
            # Every rank transforms the whole global batch alike (shared stream), then keeps its shard.
            x, y = self.train_x[global_idx], self.train_y[global_idx]
            x, targets = self._batch(x, y, epoch, ctx)
            if world > 1:  # DDP: each rank takes every world-th example of the global batch
                x, y, targets = x[:, self.rank::world], y[:, self.rank::world], targets[:, self.rank::world]
        else:
            idx = global_idx[:, self.rank::world] if world > 1 else global_idx
            x, y = self.train_x[idx], self.train_y[idx]
            targets = y
        self._hidden = [] if self._wants_hidden else None
        hook = self._activation if self._with["on_activation"] or self._wants_hidden else None
        logits = self.model(x, hook)
        # Class indices or (after on_batch) probabilities: cross_entropy takes either.
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(0, 1), reduction="none").view(K, -1)
        probe = self._probe
        if probe is not None:
            probe.saw(~_finite(ce.sum(1)), None, "forward")  # the model's own numbers overflowed: a divergence
        per_example = ce
        added = []  # (plugin, what it adds to each model's loss)
        for plug, term in self._example_terms(logits, targets, epoch, ctx):
            per_example = per_example + term
            added.append((plug, term.sum(1) / global_batch))
        self._hidden = None
        # Sum over this rank's shard / global batch size: summed over ranks this is the global-batch mean,
        # exact even when the last batch does not split evenly.
        loss = per_example.sum(1) / global_batch
        for plug, value in self._penalty(epoch, ctx):
            share = value / world  # the ranks' all-reduce sums it back to one penalty
            loss = loss + share
            added.append((plug, share))
        if added:
            with torch.no_grad():
                for plug, value in added:
                    self._penalties[plug.row] += value.detach().to(torch.float64)
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # models are independent: d(Σ_k loss_k)/dθ_k = d loss_k/dθ_k
        if self.distributed:
            self._all_reduce_grads()
        grads = [p.grad for p in self.params.values()]
        with torch.no_grad():
            # type-check: after backward every trained parameter has a gradient
            gnorm = per_model_norm(grads)  # type: ignore[arg-type]
            skip = None
            for plug in self._with["on_gradients"]:
                finite = (_all_finite(grads), _all_finite(self.params.values())) if probe is not None else None
                out = self._call(plug, "on_gradients", ctx=ctx, epoch=epoch)
                if probe is not None:
                    # type-check: the probe is on, so the finiteness was taken before the hook
                    probe.saw(finite[0] & _any_nan(grads), plug.name, "on_gradients:made the gradients NaN")  # type: ignore[index]
                    # type-check: the probe is on, so the finiteness was taken before the hook
                    probe.saw(finite[1] & _any_nan(self.params.values()), plug.name,  # type: ignore[index]
                              "on_gradients:made the parameters NaN")
                for key, value in (out or {}).items():
                    if not isinstance(value, torch.Tensor) or value.shape != (K,):
                        raise HookError(plug.name, "on_gradients",
                                        f"returned {key!r}: {_describe(value)}; expected shape ({K},)")
                    if key == "skip":
                        skip = value.bool() if skip is None else skip | value.bool()
                    elif key in counters:
                        counters[key] += value.to(torch.float64)
                    else:
                        counters[key] = value.to(torch.float64)
            snapshot = None
            if skip is not None:
                counters["skipped"] += skip.to(torch.float64)
                if not self._skip_on_host:
                    snapshot = self._snapshot_whole()
                elif bool(skip.all()):
                    self._after_step_bookkeeping(sums, ce, logits, y, loss, gnorm)
                    return
                elif bool(skip.any()):
                    snapshot = self._snapshot(skip)
            for plug in self._with["before_step"]:
                ok = _all_finite(self.params.values()) if probe is not None else None
                self._call(plug, "before_step", ctx=ctx, lr=lr_k, epoch=epoch)
                if probe is not None:
                    # type-check: the probe is on, so ok was taken before the hook
                    probe.saw(ok & _any_nan(self.params.values()), plug.name, "before_step:made the parameters NaN")  # type: ignore[operator]
        self.optimizer.step()
        with torch.no_grad():
            if probe is not None:  # non-finite gradients or an overflow in the update: a divergence
                stepped = ~skip if skip is not None else torch.ones(K, dtype=torch.bool, device=self.device)
                probe.saw(stepped & ~_all_finite(self.params.values()), None, "optimizer step")
            for plug in self._with["after_step"]:
                ok = stepped & _all_finite(self.params.values()) if probe is not None else None
                self._call(plug, "after_step", ctx=ctx, lr=lr_k, epoch=epoch)
                if probe is not None:
                    # type-check: the probe is on, so ok was taken before the hook
                    probe.saw(ok & _any_nan(self.params.values()), plug.name, "after_step:made the parameters NaN")  # type: ignore[operator]
            if snapshot is not None:
                # type-check: a snapshot is only taken together with skip
                (self._restore if self._skip_on_host else self._restore_masked)(skip, snapshot)  # type: ignore[arg-type]
            self._after_step_bookkeeping(sums, ce, logits, y, loss, gnorm)

    @torch.no_grad()
    def _after_step_bookkeeping(self, sums, ce, logits, y, loss, gnorm) -> None:
        # One in-place add for the four rows (each `sums[i] += v` is a select, an add and a copy back).
        correct = (logits.detach().argmax(-1) == y).sum(1)
        sums.add_(torch.stack([ce.detach().sum(1), correct.to(ce.dtype), loss.detach(), gnorm.to(ce.dtype)]))
        self.step_count += 1

    def _all_reduce_grads(self) -> None:
        # The only DDP communication of a step: sum the ranks' gradients in one flat buffer. Each rank's loss is
        # already scaled by 1/global_batch, so the sum is the gradient of the global-batch mean.
        grads = [p.grad for p in self.params.values()]
        # type-check: after backward every trained parameter has a gradient
        flat = torch.cat([g.flatten() for g in grads])  # type: ignore[union-attr]
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            # type-check: after backward every trained parameter has a gradient
            g.copy_(flat[offset:offset + g.numel()].view_as(g))  # type: ignore[arg-type, union-attr]
            # type-check: after backward every trained parameter has a gradient
            offset += g.numel()  # type: ignore[union-attr]

    def _stacked_state(self, p: torch.Tensor) -> list[torch.Tensor]:
        return [v for v in self.optimizer.state.get(p, {}).values()
                if isinstance(v, torch.Tensor) and _stacked(v, self.K)]

    def _snapshot(self, skip: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Copies of the skipped models' slices of parameters and optimizer state (rare: non-finite grads).
        A parameter with no optimizer state yet is marked None: its new state is zeroed for those models, as
        if they had not stepped. A scalar state such as Adam's step count is shared by the stack and is not
        rolled back."""
        saved: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for p in self.params.values():
            saved.append((p, p.detach()[skip].clone()))
            state = self._stacked_state(p)
            if state:
                saved += [(t, t[skip].clone()) for t in state]
            else:
                saved.append((p, None))
        saved += [(t, t[skip].clone()) for t in self._plugin_tensors()]
        return saved

    def _plugin_tensors(self) -> list[torch.Tensor]:
        """Every plugin's state tensors ([K, …]): a skipped model's slices are put back like its parameters."""
        return [t for plug in self.plugins for t in plug.state.values()]

    def _restore(self, skip: torch.Tensor, snapshot) -> None:
        for t, value in snapshot:
            if value is None:
                for s in self._stacked_state(t):
                    s[skip] = 0
            else:
                t.detach()[skip] = value

    def _snapshot_whole(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """_snapshot without reading the mask on the host: copies of every parameter and optimizer state tensor,
        taken on every step a gradient hook can skip (on a GPU a few device-side copies, capturable)."""
        saved: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for p in self.params.values():
            saved.append((p.detach(), p.detach().clone()))
            state = self.optimizer.state.get(p)
            if state:
                saved += [(v, v.clone()) for v in state.values() if isinstance(v, torch.Tensor)]
            else:
                saved.append((p, None))
        saved += [(t, t.clone()) for t in self._plugin_tensors()]
        return saved

    def _restore_masked(self, skip: torch.Tensor, snapshot) -> None:
        """Put the skipped models back by torch.where, with the results of _snapshot + _restore: their slices as
        before the step, a fresh (zero) state where there was none, and a scalar state shared by the stack
        (Adam's step count) rolled back only when every model skipped, as if no step had run."""
        every = skip.all()
        for t, value in snapshot:
            if value is None:  # the optimizer state was created by this step
                for s in self.optimizer.state.get(t, {}).values():
                    if isinstance(s, torch.Tensor):
                        s.masked_fill_(_per_model(skip, s) if _stacked(s, self.K) else every, 0)
            else:
                torch.where(_per_model(skip, t) if _stacked(t, self.K) else every, value, t, out=t)

    def _schedule(self, val_loss: torch.Tensor, alive: torch.Tensor) -> None:
        if self.scheduler is None:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(float(val_loss[alive].mean()))  # validation loss, never the test set
        else:
            self.scheduler.step()
        group = self.optimizer.param_groups[0]
        if isinstance(self._lr_tensor, torch.Tensor) and group["lr"] is not self._lr_tensor:
            # A captured step reads the lr from this tensor: schedulers that assign a new float must land there.
            self._lr_tensor.fill_(float(group["lr"]))
            group["lr"] = self._lr_tensor

    # -- measurements ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and accuracy of every model on (x, y), without training-only hooks: [K], [K]."""
        was_training = self.model.training
        self.model.eval()
        chosen = self._eval_params()
        model = self.model if chosen is None else (
            lambda inputs: torch.func.functional_call(self.model, chosen, (inputs,)))
        if self.world > 1:
            x, y = x[self.rank::self.world], y[self.rank::self.world]
        totals = torch.zeros(3, self.K, dtype=torch.float64, device=self.device)
        chunk = max(64, _EVAL_ROWS // self.K)
        for i in range(0, len(y), chunk):
            xb, yb = x[i:i + chunk], y[i:i + chunk]
            logits = model(xb.unsqueeze(0).expand(self.K, -1, -1))
            ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat(self.K), reduction="none").view(self.K, -1)
            totals[0] += ce.sum(1)
            totals[1] += (logits.argmax(-1) == yb).sum(1)
            totals[2] += len(yb)
        if self.distributed:
            dist.all_reduce(totals)
        self.model.train(was_training)
        totals = totals.cpu()
        return totals[0] / totals[2], totals[1] / totals[2]

    @torch.no_grad()
    def weight_norms(self) -> torch.Tensor:
        """‖θ_k‖₂ over all parameters of each model: [K]. Summed in float64 in one fixed order (once an epoch): a
        resumed run must report the very same number (bench/chaos.py saw the float32 norm kernel differ by an ulp)."""
        return torch.stack([p.detach().double().flatten(1).pow(2).sum(1) for p in self.params.values()]).sum(0).sqrt()


_NO_EVENT = 2**62


def _stacked(t: torch.Tensor, K: int) -> bool:
    """Does this tensor hold one slice per model ([K, …]), rather than a value shared by the stack?"""
    return t.dim() > 0 and t.shape[0] == K


def _per_model(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-model mask [K] shaped to broadcast against a stacked tensor [K, …]."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _finite(t: torch.Tensor) -> torch.Tensor:
    """Per model: is every value of this stacked tensor [K, …] finite? Shape [K]."""
    t = t.detach()
    return torch.isfinite(t).flatten(1).all(1) if t.dim() > 1 else torch.isfinite(t)


def _nan(t: torch.Tensor) -> torch.Tensor:
    """Per model: does this stacked tensor [K, …] hold a NaN? Shape [K]."""
    t = t.detach()
    return torch.isnan(t).flatten(1).any(1) if t.dim() > 1 else torch.isnan(t)


def _all_finite(tensors) -> torch.Tensor:
    return torch.stack([_finite(t) for t in tensors]).all(0)


def _any_nan(tensors) -> torch.Tensor:
    return torch.stack([_nan(t) for t in tensors]).any(0)


class _NonFiniteProbe:
    """Records, per model, the first point of a replayed epoch where numbers became non-finite: which plugin hook
    made them so, or None where the model's own forward pass or optimizer step did (a real divergence)."""

    def __init__(self, K: int, device: torch.device):
        self.first = torch.full((K,), _NO_EVENT, dtype=torch.long, device=device)
        self.labels: dict[int, tuple[str | None, str]] = {}
        self.step = self.pos = 0

    def start_step(self, step: int) -> None:
        self.step, self.pos = step, 0

    def saw(self, bad: torch.Tensor, plugin: str | None, what: str) -> None:
        # Events are numbered in the order a step runs them, the same on every step and every DDP rank.
        code = self.step * _EVENTS_PER_STEP + self.pos
        self.labels[self.pos] = (plugin, what)
        self.pos += 1
        self.first[bad & (self.first == _NO_EVENT)] = code

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


_EVENTS_PER_STEP = 100_000


def _plugin_trace(e: BaseException, limit: int = 6) -> str:
    """The traceback of an exception raised inside a hook, without the trainer's own frames: where in the plugin
    (file:line) it went wrong."""
    frames = list(traceback.extract_tb(e.__traceback__))
    while frames and frames[0].filename == __file__:  # drop the trainer and registry frames that called the hook
        frames.pop(0)
    frames = [f for f in frames if not f.filename.endswith("l2cluster/registry.py")][-limit:]
    return "".join(traceback.format_list(frames)).rstrip()


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:120]


def build_optimizer(cfg, params: list[torch.nn.Parameter], *, capturable: bool = False) -> torch.optim.Optimizer:
    """The torch optimizer for an optimizer config; weight_decay is always passed explicitly.

    Uses torch's fused kernels (one kernel per parameter instead of ~10; 3x faster Adam steps on CPU). With
    `capturable`, lr is a device tensor and the step count lives on the device, as CUDA graphs need."""
    lr = torch.tensor(cfg.lr, device=params[0].device) if capturable else cfg.lr
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=True)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    # Explicit weight_decay: AdamW's library default (1e-2) must never apply silently.
    return cls(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True,
               capturable=capturable)


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, epochs: int):
    """The per-epoch learning-rate scheduler for a schedule config (None for constant)."""
    sched = torch.optim.lr_scheduler
    if cfg.name == "constant":
        return None
    if cfg.name == "step":
        return sched.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.name == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=cfg.t_max or epochs, eta_min=cfg.min_lr)
    if cfg.name == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.factor, patience=cfg.patience,
                                       threshold=cfg.threshold, min_lr=cfg.min_lr)
    raise ValueError(f"schedule.name: unknown schedule {cfg.name!r}")

