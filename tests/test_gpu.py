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
