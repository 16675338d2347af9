"""Checks a regularizer plugin against the contract by training with it: `check_plugin(MyReg)`.

For plugin authors' own tests (and the built-ins'). It trains a tiny MLP on synthetic data, in float64 on the
CPU, and checks what the trainer relies on:

- **contract**: the class registers (name, Config, hook names and arguments) and every hook returns what the
  trainer expects, with every model ending "succeeded";
- **K-independence**: the K settings trained stacked give each model the numbers it gets trained alone;
- **determinism**: the same seeds give the same numbers, bit for bit;
- **exact resume**: one epoch, a checkpoint, a new trainer and one more epoch end as two epochs straight do;
- **DDP normalisation**: two gloo ranks (real processes) train what one process trains, for plugins whose
  numbers do not depend on a rank's own random stream; an `example_penalty` must also be per-example (its value
  for an example does not depend on which other examples share the rank's shard).

Raises PluginCheckError listing every check that failed; returns a CheckReport otherwise.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from l2cluster.errors import L2ClusterError
from l2cluster.plugin import Regularizer
from l2cluster.states import Outcome
from l2cluster.training.data import Splits

_TOL = 1e-7  # relative: float64 numbers that differ only by summation order


def synthetic_splits(n_train: int = 320, n_val: int = 64, n_test: int = 64, seed: int = 0) -> Splits:
    """Random 28×28 images whose label depends on a few pixels: learnable, tiny, and no MNIST needed."""
    g = torch.Generator().manual_seed(seed)

    def part(n):
        x = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        y = (x[:, 14, :10].float().mean(1) / 25.6).long().clamp(0, 9)
        return x, y

    (tx, ty), (vx, vy), (sx, sy) = part(n_train), part(n_val), part(n_test)
    return Splits(tx, ty, vx, vy, sx, sy)


class PluginCheckError(L2ClusterError, AssertionError):
    """check_plugin found contract violations; the message lists each, with what to fix."""


@dataclass
class CheckReport:
    """What check_plugin ran: the plugin's hooks, the checks passed and those not applicable (with why)."""

    plugin: str
    hooks: list[str]
    passed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)  # the per-epoch metric names a run with the plugin reports


# 100 examples at batch 16: 7 steps an epoch, the last of 4 examples (2 per rank under DDP).
_BASE = dict(data={"batch_size": 16, "val_size": 32}, epochs=2, model={"hidden_sizes": [24, 12], "dtype": "float64"},
             optimizer={"name": "adam", "lr": 1e-2})
_N_TRAIN = 100


def check_plugin(cls: type[Regularizer], settings: Sequence[Mapping] | None = None, *, ddp: bool = True,
                 optimizer: Mapping | None = None) -> CheckReport:
    """Check the plugin class `cls` against the contract (see the module docstring).

    `settings` are the plugin's config fields for the models trained stacked (default: three models with the
    default config); give different numbers to check that each model gets its own. `ddp=False` skips the
    two-process run (it takes a few seconds)."""
    from l2cluster.registry import Registry

    registry = Registry()
    registry.register(cls, "check_plugin")  # raises PluginError, naming the hook and argument to fix
    info = registry.get(cls.name)
    report = CheckReport(cls.name, sorted(info.hooks))
    settings = list(settings) if settings is not None else [{}, {}, {}]
    configs = [_config(registry, cls.name, s, seed=11 + i, optimizer=optimizer) for i, s in enumerate(settings)]
    failures: list[str] = []

    def check(name: str, ok: bool, why: str) -> None:
        (report.passed.append(name) if ok else failures.append(f"{name}: {why}"))

    stacked, results = _train(configs, registry)
    bad = [f"model {k}: {r.outcome} ({r.error})" for k, r in enumerate(results) if r.outcome != Outcome.SUCCEEDED]
    if bad:  # nothing else is meaningful
        raise PluginCheckError(f"plugin {cls.name!r}: contract: training failed: " + "; ".join(bad))
    report.passed.append("contract")
    report.metrics = sorted(results[0].epochs[-1])

    for k, cfg in enumerate(configs):
        alone, alone_results = _train([cfg], registry)
        diff = _differs(_params(stacked, k), _params(alone, 0)) or _metrics_differ(results[k], alone_results[0])
        if diff:
            check("K-independence", False, f"model {k} trained stacked with {len(configs)} models differs from it "
                  f"trained alone ({diff}); compute every number per model along the leading axis, never across it")
            break
    else:
        report.passed.append("K-independence")

    again, again_results = _train(configs, registry)
    same = all(torch.equal(a, b) for a, b in zip(_params(stacked), _params(again)))
    check("determinism", same and all(a.epochs[-1]["val_loss"] == b.epochs[-1]["val_loss"]
                                      for a, b in zip(results, again_results)),
          "two runs with the same seeds differ; draw randomness from the `rng` argument only")

    first = _trainer(configs, registry, epochs=1)
    first.fit()
    state = first.state_dict()
    resumed = _trainer(configs, registry)
    resumed.load_state_dict(state)
    resumed_results = resumed.fit()
    same = all(torch.equal(a, b) for a, b in zip(_params(stacked), _params(resumed)))
    check("exact resume", same and [r.final["val_loss"] for r in results] ==
          [r.final["val_loss"] for r in resumed_results],
          "a run resumed from a checkpoint differs from one that was not interrupted; keep state that outlives "
          "a step in init_state's tensors (saved in checkpoints), never on the instance")

    if "example_penalty" in info.hooks:
        check("per-example terms", *_per_example(stacked))

    per_rank = [h for h in ("on_activation", "example_penalty") if h in info.hooks and "rng" in info.hooks[h].args]
    if not ddp:
        report.skipped["DDP normalisation"] = "ddp=False"
    elif per_rank:
        report.skipped["DDP normalisation"] = (f"{per_rank[0]} draws from each rank's own stream, so 2 ranks "
                                               "cannot equal 1 process")
    else:
        diff = _ddp_differs(cls, settings, optimizer, stacked, results)
        check("DDP normalisation", not diff, f"2 gloo ranks differ from 1 process ({diff}); a loss term that "
              "depends on the batch belongs in example_penalty (per example: the trainer averages it over the "
              "global batch), and parameter changes must draw from the shared `rng` only")
    if failures:
        raise PluginCheckError(f"plugin {cls.name!r}:\n  " + "\n  ".join(failures))
    return report


def _config(registry, name: str, setting: Mapping, *, seed: int, optimizer: Mapping | None, epochs: int = 2):
    from l2cluster.spec.config import spec_models

    fields = {**_BASE, "seed": seed, "epochs": epochs, "regularizers": [{"name": name, **setting}]}
    if optimizer is not None:
        fields["optimizer"] = dict(optimizer)
    return spec_models(registry).train.model_validate(fields)


def _trainer(configs, registry, epochs: int | None = None):
    from l2cluster.training.trainer import Trainer

    if epochs is not None:
        configs = [c.model_copy(update={"epochs": epochs}) for c in configs]
    return Trainer(configs, synthetic_splits(n_train=_N_TRAIN), registry, device="cpu", cuda_graphs=False)


def _train(configs, registry):
    trainer = _trainer(configs, registry)
    return trainer, trainer.fit()


def _params(trainer, k: int | None = None) -> list[torch.Tensor]:
    return [(p.detach()[k] if k is not None else p.detach()).clone() for p in trainer.params.values()]


def _differs(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> str:
    for x, y in zip(a, b):
        scale = max(float(y.abs().max()), 1e-12)
        if float((x - y).abs().max()) > _TOL * scale:
            return f"parameters differ by {float((x - y).abs().max()):.3g}"
    return ""


def _metrics_differ(a, b) -> str:
    for ea, eb in zip(a.epochs, b.epochs):
        for key, va in ea.items():
            if key == "epoch_s" or not isinstance(va, float):
                continue
            if not math.isclose(va, eb[key], rel_tol=_TOL, abs_tol=1e-12):
                return f"{key} in epoch {ea['epoch']}: {va} vs {eb[key]}"
    return ""


def _per_example(trainer) -> tuple[bool, str]:
    """Call example_penalty on a batch and on its two halves: the halves' terms must be the whole's."""
    from l2cluster.plugin import TrainContext

    x = trainer.train_x[:16].unsqueeze(0).expand(trainer.K, -1, -1)
    y = trainer.train_y[:16].unsqueeze(0).expand(trainer.K, -1)
    terms = []
    for part in (slice(0, 16), slice(0, 8), slice(8, 16)):
        hidden: list[torch.Tensor] = []

        def record(h, layer, hidden=hidden):
            hidden.append(h)
            return h

        with torch.no_grad():
            logits = trainer.model(x[:, part], record)
            ctx = TrainContext(**{**trainer.ctx.__dict__, "global_batch": 16, "local_batch": logits.shape[1]})
            terms.append(torch.cat([trainer.hooks.call(p, "example_penalty", ctx=ctx, logits=logits,
                                                       targets=y[:, part], hidden=tuple(hidden), epoch=1)
                                    for p in trainer.hooks.with_hook["example_penalty"]], 1))
    whole, halves = terms[0], torch.cat(terms[1:], 1)
    ok = torch.allclose(whole, halves, rtol=_TOL, atol=1e-12)
    return ok, ("an example's term depends on the other examples of the batch; under DDP each rank holds only "
                "its shard, so batch statistics differ with the number of ranks")


def _ddp_differs(cls, settings, optimizer, stacked, results) -> str:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(cls, list(settings), optimizer, out), nprocs=2, join=True)
        for rank in range(2):
            got = torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=True)
            diff = _differs(got["params"], _params(stacked))
            if diff:
                return f"rank {rank}: {diff}"
            for k, val_loss in enumerate(got["val_loss"]):
                if not math.isclose(val_loss, results[k].final["val_loss"], rel_tol=_TOL):
                    return f"rank {rank}, model {k}: val_loss {val_loss} vs {results[k].final['val_loss']}"
    return ""


def _rank_main(rank: int, cls: type[Regularizer], settings: list, optimizer, out: str) -> None:
    import torch.distributed as dist

    from l2cluster.registry import Registry

    torch.set_num_threads(1)
    # A file rendezvous: no port to pick and race for.
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        registry = Registry()
        registry.register(cls, "check_plugin")
        configs = [_config(registry, cls.name, s, seed=11 + i, optimizer=optimizer) for i, s in enumerate(settings)]
        trainer, results = _train(configs, registry)
        torch.save({"params": _params(trainer), "val_loss": [r.final["val_loss"] for r in results]},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Leave without interpreter teardown: gloo's threads can abort a finalizing process (pytorch/pytorch#179291).
    os._exit(0)
