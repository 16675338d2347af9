"""The trainer: trains K stacked jobs (K = 1 for an ordinary job) on MNIST tensors, calling the plugin hooks.

Plain PyTorch — it never imports ray. Data lives as tensors on the training device; each step gathers a batch
by index from a per-epoch permutation derived from the job seed (no per-sample DataLoader). Works inside an
initialised torch.distributed process group: every rank draws the same global batch and takes its shard.

One step:  on_batch → forward (on_activation) → cross-entropy + example_penalty + penalty → backward
           → all-reduce (DDP) → on_gradients → before_step → optimizer step → after_step

Beside it: hooks.py calls the plugins and checks what they return, nonfinite.py finds which hook (if any) made
a model's numbers non-finite, graphs.py captures the step in a CUDA graph, skipping.py puts back the models a
hook told to skip a step; the optimizer and schedule are built by their configs (config.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from l2cluster.packing import stack_key
from l2cluster.plugin import HookError, StackedRNG, TrainContext, per_model_norm
from l2cluster.registry import Registry
from l2cluster.spec.config import TrainConfig
from l2cluster.states import Outcome
from l2cluster.training import graphs, skipping
from l2cluster.training.data import Splits
from l2cluster.training.hooks import Hooks, Plugin
from l2cluster.training.model import StackedMLP
from l2cluster.training.nonfinite import blame, snapshot

_EVAL_ROWS = 65536  # examples × models per evaluation chunk: bounds the activations' memory at any K
_NONFINITE_CHECK_EVERY = 50  # steps between divergence checks in one process (each check is a device sync)


@dataclass
class RunResult:
    """What one job's training produced: per-epoch metrics and the final numbers."""

    outcome: Outcome | None = None  # None while the model trains
    epochs: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    diverged_epoch: int | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        """Plain data (the outcome as its string), as checkpoints hold it: torch.load(weights_only=True) reads it."""
        return {**asdict(self), "outcome": self.outcome.value if self.outcome is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        outcome = d["outcome"]  # "running" in checkpoints written before None meant it
        return cls(**{**d, "outcome": Outcome(outcome) if outcome not in (None, "running") else None})


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
        self._param_list = list(self.params.values())  # the same, in order, for the step (made once)
        # Every rank draws the same permutation (the global batch), then takes its shard.
        self.order_gens = [torch.Generator().manual_seed(derive_seed(s, "order")) for s in seeds]
        # Two random streams per model: this rank's own (activations: dropout), and one shared by the ranks for
        # what every rank must draw alike (the global batch's transforms, changes to the parameters).
        self.rng = StackedRNG([derive_seed(s, "dropout", self.rank) for s in seeds], self.device)
        self.shared_rng = StackedRNG([derive_seed(s, "shared") for s in seeds], self.device)
        n_train, batch = len(self.train_y), cfg.data.batch_size
        self.ctx = TrainContext(
            num_models=K, world_size=self.world, rank=self.rank, global_batch=batch,
            local_batch=len(range(self.rank, batch, self.world)), steps_per_epoch=math.ceil(n_train / batch),
            train_size=n_train, num_classes=self.model.num_classes, device=self.device, dtype=self.dtype)
        # Progress, all of it in state_dict(): a run resumed from a checkpoint continues exactly.
        self.step_count = 0
        self.epochs_done = 0
        self.train_s = 0.0
        self.alive = torch.ones(K, dtype=torch.bool)
        self.best: list[tuple[float, int]] = [(-1.0, 0)] * K
        self.results = [RunResult() for _ in range(K)]

        self.hooks = Hooks(configs, registry, self.ctx, self.params, self.rng, self.shared_rng,
                           step=lambda: self.step_count, num_layers=self.model.num_hidden)
        self.hook_error: HookError | None = None  # set when a hook raised and failed the whole stack
        # Why this trainer replays no CUDA graph (None while it does): for the job's log.
        self.graphs_off_reason = (graphs.why_not(self.device, self.world, [p.info for p in self.plugins])
                                  if cuda_graphs is not False else "turned off by the caller (cuda_graphs=False)")
        self.graphs = self.graphs_off_reason is None
        self.graph_error: str | None = None  # why capturing the step failed (then it trains eagerly)
        # A gradient hook may skip some models' steps. Where reading that mask is free (CPU) the host decides;
        # on a GPU it would wait for the device every step (and cannot be captured), so the skipped models are
        # put back by a device-side mask instead (skipping.snapshot_whole). Tests set it to compare the two.
        self.skip_on_host = self.device.type != "cuda"
        if self.device.type == "cuda":
            # cuBLAS and cuDNN read process-wide flags: set them for this run (a worker trains one stack at a
            # time). Both always, as cuDNN's default is on.
            torch.backends.cuda.matmul.allow_tf32 = cfg.model.tf32
            torch.backends.cudnn.allow_tf32 = cfg.model.tf32
        # Under CUDA graphs the optimizer's step count and lr live on the device (capturable), so one captured
        # step serves every step and every scheduled lr.
        self.optimizer = cfg.optimizer.build(self._param_list, capturable=self.graphs)
        self.scheduler = cfg.schedule.build(self.optimizer, cfg.epochs)
        self.lr = graphs.DeviceLR(self.optimizer)
        self.captured = graphs.CapturedStep(self.optimizer, self.rng.generators + self.shared_rng.generators)

        # Per-model sums over an epoch's steps, kept on the device so the loop never waits for it: rows = CE loss
        # sum, correct, objective (loss + penalty) sum, grad-norm sum; the hooks' counters; and per plugin that
        # adds to the loss, what it added.
        self.sums = torch.zeros(4, K, dtype=torch.float64, device=self.device)
        self.counters = {k: torch.zeros(K, dtype=torch.float64, device=self.device) for k in ("clipped", "skipped")}
        self.penalties = torch.zeros(len(self.hooks.loss_plugins), K, dtype=torch.float64, device=self.device)
        self._lr_k = torch.zeros(K, dtype=self.dtype, device=self.device)  # the lr, as the step hooks get it

    @property
    def plugins(self) -> list[Plugin]:
        return self.hooks.plugins

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        # ToTensor's scaling: pixels / 255 in [0, 1], flattened to 784 (the article's loop forgot to flatten).
        return images.reshape(len(images), -1).to(self.device).to(self.dtype).div_(255)

    def _labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.to(device=self.device, dtype=torch.long)

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
            cancelled = self._fit(on_epoch, should_stop, on_step)
        except HookError as e:
            self.hook_error = e
            for r in results:
                if r.outcome is None:
                    r.outcome, r.error = Outcome.FAILED, str(e)
            return results
        for r in results:
            if r.outcome is None:
                r.outcome = Outcome.CANCELLED if cancelled else Outcome.SUCCEEDED
        return results

    def _fit(self, on_epoch, should_stop, on_step) -> bool:
        """The remaining epochs, then the test set; True when should_stop ended the whole run."""
        t_start = time.perf_counter() - self.train_s
        for epoch in range(self.epochs_done + 1, self.cfg.epochs + 1):
            t0 = time.perf_counter()
            steps_before = self.step_count
            self.model.train()
            # Where the epoch starts, so that a non-finite loss can be traced to the plugin that caused it by
            # replaying the epoch (nonfinite.blame).
            epoch_start = snapshot(self) if self.plugins else None
            order = torch.stack([torch.randperm(len(self.train_y), generator=g) for g in self.order_gens])
            order = order.to(self.device)
            lr = float(self.optimizer.param_groups[0]["lr"])
            self._lr_k.fill_(lr)
            if self._train_epoch(epoch, order, should_stop, on_step):
                return True
            metrics = self._end_epoch(epoch, order, epoch_start, self.step_count - steps_before, lr, t0)
            self.epochs_done = epoch
            self.train_s = time.perf_counter() - t_start
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            if not self.alive.any():
                break
        test_loss, test_acc = self.evaluate(self.test_x, self.test_y)
        self.train_s = time.perf_counter() - t_start
        for k in range(self.K):
            if self.alive[k]:
                self.finalize(k, float(test_loss[k]), float(test_acc[k]))
            elif not self.results[k].final:
                self.finalize(k)
        return False

    def _train_epoch(self, epoch: int, order: torch.Tensor, should_stop, on_step) -> bool:
        """The steps of one epoch over `order` [K, N]; True when should_stop ended the whole run."""
        batch = self.cfg.data.batch_size
        num_steps = math.ceil(order.shape[1] / batch)
        for t in (self.sums, self.penalties, *self.counters.values()):
            t.zero_()
        for s in range(num_steps):
            stop = should_stop() if should_stop is not None else False
            if stop and (stop is True or not self.stop_models(stop)):
                return True
            global_idx = order[:, s * batch:(s + 1) * batch]
            if self.graphs and global_idx.shape[1] == batch:
                self._graph_step(global_idx, epoch)
            else:
                self.step(global_idx, epoch, self.sums, self.counters)
            if on_step is not None:
                on_step(epoch, s + 1, num_steps)
            check = self.world == 1 and s % _NONFINITE_CHECK_EVERY == _NONFINITE_CHECK_EVERY - 1
            if check and not bool(torch.isfinite(self.sums[2].cpu())[self.alive].any()):
                break  # every live model has diverged: no point finishing the epoch
        return False

    def _end_epoch(self, epoch: int, order: torch.Tensor, epoch_start: dict | None, steps: int, lr: float,
                   t0: float) -> list[dict]:
        """After an epoch's `steps`: each model's metrics (an empty dict for one that had ended), models whose
        numbers became non-finite ended (failed when a plugin hook is to blame, else diverged), the lr
        scheduled."""
        K, alive, results, sums = self.K, self.alive, self.results, self.sums
        n = len(self.train_y)
        if self.distributed:
            # One collective for the epoch's metrics. Grad norms and hook counters need none: every rank
            # saw the same all-reduced gradients.
            dist.all_reduce(sums[:3])
            if len(self.penalties):  # each rank added its share of the loss terms
                dist.all_reduce(self.penalties)
        val_loss, val_acc = self.evaluate(self.val_x, self.val_y)
        epoch_s = time.perf_counter() - t0
        sums_cpu, counts = sums.cpu(), {k: v.cpu() for k, v in self.counters.items()}
        steps_run = max(1, steps)
        penalties = (self.penalties / steps_run).cpu()
        wnorm = self.weight_norms().cpu()
        nonfinite = [k for k in range(K) if alive[k] and not (
            math.isfinite(float(sums_cpu[2, k])) and math.isfinite(float(val_loss[k])))]
        blamed = {}
        if nonfinite and epoch_start is not None:
            blamed = blame(self, epoch, order, epoch_start, steps, nonfinite)
        epoch_metrics: list[dict] = []
        for k in range(K):
            if not alive[k]:
                epoch_metrics.append({})
                continue
            m: dict = {
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
                **{p.metric: float(penalties[p.row, k]) for p in self.hooks.loss_plugins},
                "epoch_s": epoch_s,
            }
            results[k].epochs.append(m)
            if k in blamed:  # a plugin made the numbers non-finite: its error, not a divergence
                alive[k] = False
                results[k].outcome, results[k].error = Outcome.FAILED, blamed[k]
            elif k in nonfinite:
                alive[k] = False
                results[k].outcome, results[k].diverged_epoch = Outcome.DIVERGED, epoch
                results[k].error = f"loss became non-finite in epoch {epoch}"
            elif m["val_acc"] > self.best[k][0]:
                self.best[k] = (m["val_acc"], epoch)
            epoch_metrics.append(m)
        self._schedule(val_loss)
        return epoch_metrics

    def _schedule(self, val_loss: torch.Tensor) -> None:
        if self.scheduler is None:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(float(val_loss[self.alive].mean()))  # validation loss, never the test set
        else:
            self.scheduler.step()
        self.lr.after_schedule()

    def stop_models(self, models) -> bool:
        """End these models now with outcome "cancelled" (the others train on); False when none is left."""
        for k in models:
            if self.alive[k]:
                self.alive[k] = False
                self.results[k].outcome = Outcome.CANCELLED
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

    # -- the step -------------------------------------------------------------------------------------------
    def step(self, global_idx: torch.Tensor, epoch: int, sums: torch.Tensor,
             counters: dict[str, torch.Tensor]) -> None:
        """One optimizer step on the global batch `global_idx` [K, B] (this rank trains on its shard of it); adds
        its metrics to `sums` and the gradient hooks' counts to `counters`."""
        K = self.K
        global_batch = global_idx.shape[1]
        ctx = self.ctx
        if global_batch != ctx.global_batch:  # the epoch's last, smaller batch
            ctx = dataclasses.replace(ctx, global_batch=global_batch,
                                      local_batch=len(range(self.rank, global_batch, self.world)))
        x, y, targets = self._inputs(global_idx, epoch, ctx)
        logits = self.model(x, self.hooks.forward_hook())
        # Class indices or (after on_batch) probabilities: cross_entropy takes either.
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(0, 1), reduction="none").view(K, -1)
        self.hooks.watch.forward(ce)
        loss = self._loss(ce, logits, targets, epoch, ctx)
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # models are independent: d(Σ_k loss_k)/dθ_k = d loss_k/dθ_k
        if self.distributed:
            self._all_reduce_grads()
        params = self._param_list
        # type-check: after backward every trained parameter has a gradient
        grads: list[torch.Tensor] = [p.grad for p in params]  # type: ignore[misc]
        with torch.no_grad():
            gnorm = per_model_norm(grads)
            skip = self.hooks.on_gradients(grads, epoch, ctx, counters)
            saved = None
            if skip is not None:
                counters["skipped"] += skip.to(torch.float64)
                if not self.skip_on_host:
                    saved = skipping.snapshot_whole(params, self.optimizer, self.hooks.state_tensors())
                elif bool(skip.all()):  # no model steps
                    self._count_step(sums, ce, logits, y, loss, gnorm)
                    return
                elif bool(skip.any()):
                    saved = skipping.snapshot(skip, params, self.optimizer, self.hooks.state_tensors(), K)
            self.hooks.before_step(self._lr_k, epoch, ctx)
        self.optimizer.step()
        with torch.no_grad():
            self.hooks.watch.optimizer_step(skip, params)
            self.hooks.after_step(self._lr_k, epoch, ctx)
            if saved is not None:
                # type-check: a snapshot is only taken together with skip
                restore = skipping.restore if self.skip_on_host else skipping.restore_masked
                restore(skip, saved, self.optimizer, K)  # type: ignore[arg-type]
            self._count_step(sums, ce, logits, y, loss, gnorm)

    def _inputs(self, global_idx: torch.Tensor, epoch: int, ctx: TrainContext):
        """This rank's inputs, labels and targets (labels, or what on_batch made of them) of the global batch."""
        world = self.world
        if self.hooks.with_hook["on_batch"]:
            # Every rank transforms the whole global batch alike (shared stream), then keeps its shard.
            x, y = self.train_x[global_idx], self.train_y[global_idx]
            x, targets = self.hooks.on_batch(x, y, epoch, ctx)
            if world > 1:  # DDP: each rank takes every world-th example of the global batch
                x, y, targets = x[:, self.rank::world], y[:, self.rank::world], targets[:, self.rank::world]
            return x, y, targets
        idx = global_idx[:, self.rank::world] if world > 1 else global_idx
        x, y = self.train_x[idx], self.train_y[idx]
        return x, y, y

    def _loss(self, ce: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, epoch: int,
              ctx: TrainContext) -> torch.Tensor:
        """Each model's loss [K]: cross-entropy plus the plugins' example terms and penalties. Adds what each
        plugin added to `penalties`."""
        global_batch = ctx.global_batch
        per_example = ce
        added = []  # (plugin, what it adds to each model's loss)
        for plug, term in self.hooks.example_penalties(logits, targets, epoch, ctx):
            per_example = per_example + term
            added.append((plug, term.sum(1) / global_batch))
        # Sum over this rank's shard / global batch size: summed over ranks this is the global-batch mean,
        # exact even when the last batch does not split evenly.
        loss = per_example.sum(1) / global_batch
        for plug, value in self.hooks.penalties(epoch, ctx):
            share = value / self.world  # the ranks' all-reduce sums it back to one penalty
            loss = loss + share
            added.append((plug, share))
        if added:
            with torch.no_grad():
                for plug, value in added:
                    self.penalties[plug.row] += value.detach().to(torch.float64)
        return loss

    def _all_reduce_grads(self) -> None:
        # The only DDP communication of a step: sum the ranks' gradients in one flat buffer. Each rank's loss is
        # already scaled by 1/global_batch, so the sum is the gradient of the global-batch mean.
        # type-check: after backward every trained parameter has a gradient
        grads: list[torch.Tensor] = [p.grad for p in self._param_list]  # type: ignore[misc]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def _count_step(self, sums, ce, logits, y, loss, gnorm) -> None:
        # One in-place add for the four rows (each `sums[i] += v` is a select, an add and a copy back).
        correct = (logits.detach().argmax(-1) == y).sum(1)
        sums.add_(torch.stack([ce.detach().sum(1), correct.to(ce.dtype), loss.detach(), gnorm.to(ce.dtype)]))
        self.step_count += 1

    def _graph_step(self, idx: torch.Tensor, epoch: int) -> None:
        steps = self.step_count
        self.captured.step(idx, lambda i: self.step(i, epoch, self.sums, self.counters))
        self.step_count = steps + 1  # a capture records the step without running it; the replay runs it
        if self.captured.error is not None:  # something in the step cannot be captured: train eagerly instead
            self.graphs, self.graph_error = False, self.captured.error
            self.graphs_off_reason = f"capture failed: {self.graph_error}"

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
            "plugin_state": self.hooks.state_dict(),
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
        self.lr.load_state_dict(state["optimizer"])  # the optimizer's state, its lr where a CUDA graph reads it
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for g, s in zip(self.order_gens, state["order_rng"]):
            g.set_state(s)
        self.rng.set_state(state["dropout_rng"])
        if "shared_rng" in state:  # absent from checkpoints written before it existed (nothing drew from it)
            self.shared_rng.set_state(state["shared_rng"])
        self.hooks.load_state(state.get("plugin_state") or [{} for _ in self.plugins])
        self.epochs_done, self.step_count, self.train_s = state["epochs_done"], state["step_count"], state["train_s"]
        self.alive = state["alive"].clone()
        self.best = [tuple(b) for b in state["best"]]
        self.results = [RunResult.from_dict(r) for r in state["results"]]

    # -- measurements ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and accuracy of every model on (x, y), without training-only hooks: [K], [K]."""
        was_training = self.model.training
        self.model.eval()
        chosen = self.hooks.eval_params()
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
