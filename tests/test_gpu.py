"""The trainer on a CUDA GPU: same results as the CPU in float64, stacked training, fast data on the device.
Skipped where there is no GPU."""

from __future__ import annotations

import pytest
import torch
from support import config, params_of, registry, synthetic_splits

from l2cluster.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SMALL = dict(model={"hidden_sizes": [64, 32], "dtype": "float64"}, data={"batch_size": 32, "val_size": 64},
             epochs=2, optimizer={"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
             regularizers=[{"name": "l2", "strength": 1e-3}, {"name": "grad_clip", "max_norm": 1.0}])


def test_cuda_matches_cpu_in_float64():
    splits = synthetic_splits(n_train=640)
    cpu = Trainer([config(**SMALL)], splits, registry(), device="cpu")
    gpu = Trainer([config(**SMALL)], splits, registry(), device="cuda")
    (rc,), (rg,) = cpu.fit(), gpu.fit()
    assert gpu.train_x.is_cuda and gpu.params["layers.0.weight"].is_cuda  # the data lives on the GPU
    pc, pg = params_of(cpu), params_of(gpu)
    for name in pc:
        assert torch.allclose(pc[name], pg[name].cpu(), rtol=0, atol=1e-9), name
    assert rc.final["val_loss"] == pytest.approx(rg.final["val_loss"], rel=1e-9)


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
    assert graphed.graphs and graphed._graph is not None, graphed.graph_error
    assert not eager.graphs
    assert graphed.step_count == eager.step_count == 3 * 21
    assert [m["lr"] for m in rg.epochs] == pytest.approx([m["lr"] for m in re.epochs])
    for name, p in params_of(eager).items():
        assert torch.allclose(params_of(graphed)[name], p, rtol=1e-4, atol=1e-5), name
    assert rg.final["val_loss"] == pytest.approx(re.final["val_loss"], rel=1e-4)


def test_gradient_hooks_keep_the_eager_path():
    cfg = config(**{**GRAPHABLE, "regularizers": [{"name": "grad_clip", "max_norm": 1.0}]})
    assert not Trainer([cfg], synthetic_splits(), registry(), device="cuda").graphs


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
    eager = Trainer([cfg], splits, reg, device="cuda", cuda_graphs=False)
    (re,) = eager.fit()
    assert r.final["val_loss"] == pytest.approx(re.final["val_loss"], rel=1e-4)


def test_a_cuda_graph_run_resumed_from_a_checkpoint_ends_as_an_uninterrupted_one(tmp_path):
    """What the daemon does after a lost rank, on the GPU: the state saved after epoch 1 (graphs, dropout streams
    advanced by replays) is loaded by a new trainer, which captures its own graph and finishes identically."""
    from l2cluster.checkpoint import JobCheckpoints

    splits = synthetic_splits(n_train=64 * 20 + 17)
    full = Trainer([config(**GRAPHABLE)], splits, registry(), device="cuda")
    (rf,) = full.fit()
    ckpt = JobCheckpoints(tmp_path, "0123456789abcdef", rank=0)
    first = Trainer([config(**GRAPHABLE)], splits, registry(), device="cuda")
    first.fit(on_epoch=lambda epoch, m: ckpt.save(epoch, first.state_dict()) if epoch == 1 else None)
    resumed = Trainer([config(**GRAPHABLE)], splits, registry(), device="cuda")
    resumed.load_state_dict(ckpt.load(1))
    (rr,) = resumed.fit()
    assert full.graphs and resumed.graphs and resumed._graph is not None, resumed.graph_error
    for name, p in params_of(full).items():
        assert torch.equal(p, params_of(resumed)[name]), name
    assert rr.final["val_loss"] == rf.final["val_loss"] and rr.final["test_acc"] == rf.final["test_acc"]
