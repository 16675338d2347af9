"""The trainer on a CUDA GPU: same results as the CPU in float64, stacked training, fast data on the device,
every built-in regularizer under CUDA graphs (skipped steps included), TF32. Skipped where there is no GPU."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from support import InfGradients, config, params_of, registry, registry_with, synthetic_splits

from l2cluster.plugin import Regularizer
from l2cluster.training.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SMALL = dict(model={"hidden_sizes": [64, 32], "dtype": "float64"}, data={"batch_size": 32, "val_size": 64},
             epochs=2, optimizer={"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
             regularizers=[{"name": "l2", "strength": 1e-3}, {"name": "grad_clip", "max_norm": 1.0}])


# Under CUDA graphs the optimizer is "capturable": torch keeps Adam's step count as a float32 tensor on the device,
# so its bias correction is rounded to float32 and float64 parameters drift from the CPU's by ~1e-9 after a few
# dozen steps (seen on an H100: 1e-9 to 2e-9). Eager GPU steps match the CPU to 1e-9.
GRAPHED_ATOL = 1e-7


@pytest.mark.parametrize("graphs", [False, None])
def test_cuda_matches_cpu_in_float64(graphs):
    splits = synthetic_splits(n_train=640)
    cpu = Trainer([config(**SMALL)], splits, registry(), device="cpu")
    gpu = Trainer([config(**SMALL)], splits, registry(), device="cuda", cuda_graphs=graphs)
    (rc,), (rg,) = cpu.fit(), gpu.fit()
    assert gpu.train_x.is_cuda and gpu.params["layers.0.weight"].is_cuda  # the data lives on the GPU
    assert gpu.graphs == (graphs is None)
    atol = GRAPHED_ATOL if gpu.graphs else 1e-9
    pc, pg = params_of(cpu), params_of(gpu)
    for name in pc:
        assert torch.allclose(pc[name], pg[name].cpu(), rtol=0, atol=atol), name
    assert rc.final["val_loss"] == pytest.approx(rg.final["val_loss"], rel=atol)


def test_cuda_stacked_with_dropout_trains_every_model(shared_mnist_dir):
    splits = synthetic_splits(n_train=2048)
    cfgs = [config(seed=s, model={"hidden_sizes": [128, 64]}, data={"batch_size": 64, "val_size": 64}, epochs=3,
                   optimizer={"name": "adam", "lr": 3e-3},
                   regularizers=[{"name": "dropout", "p": p}]) for s, p in zip(range(8), [0.0, 0.1, 0.2, 0.3] * 2)]
    results = Trainer(cfgs, splits, registry(), device="cuda").fit()
    assert [r.outcome for r in results] == ["succeeded"] * 8
    assert all(r.epochs[-1]["train_loss"] < r.epochs[0]["train_loss"] for r in results)
    assert len({round(r.final["val_loss"], 8) for r in results}) == 8


GRAPHABLE = dict(model={"hidden_sizes": [128, 64]}, data={"batch_size": 64, "val_size": 64}, epochs=3,
                 optimizer={"name": "adamw", "lr": 3e-3, "weight_decay": 0.0}, schedule={"name": "cosine"},
                 regularizers=[{"name": "l2", "strength": 1e-3}, {"name": "dropout", "p": 0.2},
                               {"name": "decoupled_decay", "weight_decay": 0.01}])


def test_cuda_graph_replay_trains_like_eager_steps():
    splits = synthetic_splits(n_train=64 * 20 + 17)  # a partial last batch, which runs eagerly
    graphed = Trainer([config(**GRAPHABLE)], splits, registry(), device="cuda")
    eager = Trainer([config(**GRAPHABLE)], splits, registry(), device="cuda", cuda_graphs=False)
    (rg,), (re,) = graphed.fit(), eager.fit()
    assert graphed.graphs and graphed.captured.graph is not None, graphed.graph_error
    assert not eager.graphs
    assert graphed.step_count == eager.step_count == 3 * 21
    assert [m["lr"] for m in rg.epochs] == pytest.approx([m["lr"] for m in re.epochs])
    for name, p in params_of(eager).items():
        assert torch.allclose(params_of(graphed)[name], p, rtol=1e-4, atol=1e-5), name
    assert rg.final["val_loss"] == pytest.approx(re.final["val_loss"], rel=1e-4)


def _every_builtin(mode: str, strength: float) -> list[dict]:
    return [{"name": "l2", "strength": strength}, {"name": "dropout", "p": 0.2},
            {"name": "decoupled_decay", "weight_decay": 0.01},
            {"name": "grad_clip", "mode": mode, "max_norm": 0.5, "max_value": 0.01}]


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_every_builtin_trains_under_cuda_graphs_like_eager_steps(mode):
    """l2, dropout, decoupled_decay and grad_clip (either mode), two models stacked: one captured step, replayed,
    ends where eager steps end."""
    splits = synthetic_splits(n_train=64 * 20 + 17)
    cfgs = [config(seed=s, **{**GRAPHABLE, "regularizers": _every_builtin(mode, lam)})
            for s, lam in ((0, 1e-3), (1, 1e-2))]
    graphed = Trainer(cfgs, splits, registry(), device="cuda")
    eager = Trainer(cfgs, splits, registry(), device="cuda", cuda_graphs=False)
    rg, re = graphed.fit(), eager.fit()
    assert graphed.graphs and graphed.captured.graph is not None and graphed.graphs_off_reason is None, \
        graphed.graphs_off_reason
    assert not eager.graphs and "cuda_graphs=False" in eager.graphs_off_reason
    assert graphed.step_count == eager.step_count == 3 * 21
    for k in range(2):
        clipped = [sum(m["clipped_steps"] for m in r[k].epochs) for r in (rg, re)]
        assert clipped[0] > 0 and abs(clipped[0] - clipped[1]) <= 1, clipped  # the clip was at work in both
        assert rg[k].final["val_loss"] == pytest.approx(re[k].final["val_loss"], rel=1e-4)
    for name, p in params_of(eager).items():
        assert torch.allclose(params_of(graphed)[name], p, rtol=1e-4, atol=1e-5), name


def test_the_contract_v2_builtins_train_under_cuda_graphs_like_eager_steps():
    """mixup (on_batch: Beta draws and a permutation from the shared stream), label_smoothing (example_penalty),
    l1, max_norm and ema (per-job state, eval_params), two models stacked: captured once, replayed, they end where
    eager steps end, and the EMA state advanced on every replay."""
    splits = synthetic_splits(n_train=64 * 20 + 17)
    regs = lambda a, eps: [{"name": "mixup", "alpha": a}, {"name": "label_smoothing", "epsilon": eps},  # noqa: E731
                           {"name": "l1", "strength": 1e-4}, {"name": "max_norm", "max_norm": 2.0},
                           {"name": "ema", "decay": 0.9}]
    cfgs = [config(seed=s, **{**GRAPHABLE, "regularizers": regs(a, eps)})
            for s, a, eps in ((0, 0.2, 0.1), (1, 1.0, 0.3))]
    graphed = Trainer(cfgs, splits, registry(), device="cuda")
    eager = Trainer(cfgs, splits, registry(), device="cuda", cuda_graphs=False)
    rg, re = graphed.fit(), eager.fit()
    assert graphed.graphs and graphed.captured.graph is not None and graphed.graphs_off_reason is None, \
        graphed.graphs_off_reason
    ema = [t.plugins[-1].state["updates"].tolist() for t in (graphed, eager)]
    assert ema[0] == ema[1] == [graphed.step_count] * 2
    for k in range(2):
        assert rg[k].final["val_loss"] == pytest.approx(re[k].final["val_loss"], rel=1e-4)
        assert rg[k].epochs[-1]["penalty_label_smoothing"] == pytest.approx(
            re[k].epochs[-1]["penalty_label_smoothing"], rel=1e-4)
    for name, p in params_of(eager).items():
        assert torch.allclose(params_of(graphed)[name], p, rtol=1e-4, atol=1e-5), name


SKIPPING = dict(model={"hidden_sizes": [64, 32], "dtype": "float64"}, data={"batch_size": 32, "val_size": 64},
                epochs=2, optimizer={"name": "adam", "lr": 3e-3})


def _skipping(reg, when):
    return [config(reg, seed=k, regularizers=[{"name": "inf_gradients", "when": w}, {"name": "l2", "strength": 1e-3},
                                              {"name": "grad_clip", "max_norm": 1.0}], **SKIPPING)
            for k, w in enumerate(when)]


def test_models_with_nonfinite_gradients_are_skipped_inside_the_cuda_graph():
    """Three models stacked whose gradients are never inf, inf on about half the steps, always inf: grad_clip
    skips those steps by a device-side mask inside the graph. The results equal eager GPU steps and the CPU's
    host-side skipping (float64), and the always-skipped model ends exactly as initialised."""
    reg = registry_with(InfGradients)
    cfgs = _skipping(reg, when=(0, 1, 2))
    splits = synthetic_splits(n_train=32 * 20)
    init = params_of(Trainer(cfgs, splits, reg, device="cpu"), 2)
    runs = {"graphed": Trainer(cfgs, splits, reg, device="cuda"),
            "eager": Trainer(cfgs, splits, reg, device="cuda", cuda_graphs=False),
            "cpu": Trainer(cfgs, splits, reg, device="cpu")}
    results = {name: t.fit() for name, t in runs.items()}
    graphed = runs["graphed"]
    assert graphed.graphs and graphed.captured.graph is not None, graphed.graphs_off_reason
    skipped = {name: [sum(m["skipped_steps"] for m in r.epochs) for r in rs] for name, rs in results.items()}
    assert skipped["graphed"] == skipped["eager"] == skipped["cpu"], skipped
    assert skipped["cpu"][0] == 0 and 0 < skipped["cpu"][1] < 40 and skipped["cpu"][2] == 40
    for name, atol in (("graphed", GRAPHED_ATOL), ("eager", 1e-9)):
        for n, p in params_of(runs["cpu"]).items():
            assert torch.allclose(params_of(runs[name])[n].cpu(), p, rtol=0, atol=atol), (name, n)
    for n, p in params_of(graphed, 2).items():
        assert torch.equal(p.cpu(), init[n]), n

    # Alone and skipped on every step: nothing moves, not even Adam's step count (no model of the stack stepped).
    alone = Trainer(_skipping(reg, when=(2,)), splits, reg, device="cuda")
    (r,) = alone.fit()
    assert alone.graphs and alone.captured.graph is not None, alone.graphs_off_reason
    assert r.outcome == "succeeded" and sum(m["skipped_steps"] for m in r.epochs) == 40
    for n, p in params_of(alone, 0).items():
        assert torch.equal(p.cpu(), params_of(Trainer(_skipping(reg, when=(2,)), splits, reg, device="cpu"), 0)[n])
    assert all(int(s["step"]) == 0 for s in alone.optimizer.state.values())


def test_tf32_changes_float32_numbers_slightly_and_float64_not_at_all():
    splits = synthetic_splits(n_train=64 * 20)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for dtype in ("float32", "float64"):
            runs = []
            for tf32 in (False, True):
                cfg = config(**{**GRAPHABLE, "epochs": 1, "regularizers": [{"name": "l2", "strength": 1e-3}],
                                "model": {"hidden_sizes": [256, 128], "dtype": dtype, "tf32": tf32}})
                trainer = Trainer([cfg], splits, registry(), device="cuda")
                assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
                (r,) = trainer.fit()
                assert trainer.graphs, trainer.graphs_off_reason
                runs.append((params_of(trainer), r.final["val_loss"]))
            (p_off, loss_off), (p_on, loss_on) = runs
            same = all(torch.equal(p_off[n], p_on[n]) for n in p_off)
            if dtype == "float64":
                assert same and loss_on == loss_off
            else:
                assert not same and loss_on != loss_off
                assert loss_on == pytest.approx(loss_off, rel=2e-2)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_grad_clip_failing_on_nonfinite_gradients_trains_eagerly_and_says_why():
    """Raising needs the gradient norm on the host every step; the capture is refused and the run goes on."""
    cfg = config(**{**GRAPHABLE, "regularizers": [{"name": "grad_clip", "max_norm": 1.0, "on_nonfinite": "fail"}]})
    splits = synthetic_splits(n_train=64 * 10)
    trainer = Trainer([cfg], splits, registry(), device="cuda")
    (r,) = trainer.fit()
    assert r.outcome == "succeeded" and not trainer.graphs and trainer.captured.graph is None
    reason = trainer.graphs_off_reason
    assert reason.startswith("capture failed: ") and "grad_clip" in reason and "on_nonfinite" in reason, reason
    eager = Trainer([cfg], splits, registry(), device="cuda", cuda_graphs=False)
    (re,) = eager.fit()
    assert r.final["val_loss"] == pytest.approx(re.final["val_loss"], rel=1e-4)


def test_a_hook_taking_the_step_keeps_the_eager_path_and_says_why():
    class StepAware(Regularizer):
        name = "step_aware"

        class Config(BaseModel):
            model_config = ConfigDict(extra="forbid")

        def penalty(self, params, step):
            return params["layers.0.bias"].flatten(1).sum(1) * 0

    reg = registry_with(StepAware)
    trainer = Trainer([config(reg, **{**GRAPHABLE, "regularizers": [{"name": "step_aware"}]})], synthetic_splits(),
                      reg, device="cuda")
    assert not trainer.graphs
    assert trainer.graphs_off_reason == "plugin 'step_aware', hook 'penalty' takes step (a graph would freeze it)"


def test_a_hook_that_cannot_be_captured_falls_back_to_eager_steps():
    from pydantic import BaseModel, ConfigDict

    from l2cluster.plugin import Regularizer
    from l2cluster.registry import Registry, load_builtins

    class HostReading(Regularizer):
        name = "host_reading"

        class Config(BaseModel):
            model_config = ConfigDict(extra="forbid")
            strength: float = 1e-3

        def penalty(self, params, hp):
            if float(hp.strength[0]) == 0:  # reads a GPU value on the host: not capturable
                return torch.zeros_like(hp.strength)
            return hp.strength * sum(p.pow(2).flatten(1).sum(1) for p in params.values())

    reg = Registry()
    load_builtins(reg)
    reg.register(HostReading, "test")
    cfg = config(reg, **{**GRAPHABLE, "regularizers": [{"name": "host_reading"}]})
    splits = synthetic_splits(n_train=64 * 10)
    trainer = Trainer([cfg], splits, reg, device="cuda")
    (r,) = trainer.fit()
    assert r.outcome == "succeeded" and not trainer.graphs and trainer.graph_error
    assert trainer.graphs_off_reason == f"capture failed: {trainer.graph_error}"
    eager = Trainer([cfg], splits, reg, device="cuda", cuda_graphs=False)
    (re,) = eager.fit()
    assert r.final["val_loss"] == pytest.approx(re.final["val_loss"], rel=1e-4)


def test_a_cuda_graph_run_resumed_from_a_checkpoint_ends_as_an_uninterrupted_one(tmp_path):
    """What the daemon does after a lost rank, on the GPU: the state saved after epoch 1 (graphs, dropout streams
    advanced by replays) is loaded by a new trainer, which captures its own graph and finishes identically."""
    from l2cluster.training.checkpoint import JobCheckpoints

    splits = synthetic_splits(n_train=64 * 20 + 17)
    full = Trainer([config(**GRAPHABLE)], splits, registry(), device="cuda")
    (rf,) = full.fit()
    ckpt = JobCheckpoints(tmp_path, "0123456789abcdef", rank=0)
    first = Trainer([config(**GRAPHABLE)], splits, registry(), device="cuda")
    first.fit(on_epoch=lambda epoch, m: ckpt.save(epoch, first.state_dict()) if epoch == 1 else None)
    resumed = Trainer([config(**GRAPHABLE)], splits, registry(), device="cuda")
    resumed.load_state_dict(ckpt.load(1))
    (rr,) = resumed.fit()
    assert full.graphs and resumed.graphs and resumed.captured.graph is not None, resumed.graph_error
    for name, p in params_of(full).items():
        assert torch.equal(p, params_of(resumed)[name]), name
    assert rr.final["val_loss"] == rf.final["val_loss"] and rr.final["test_acc"] == rf.final["test_acc"]
