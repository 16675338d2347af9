"""The trainer end to end at toy size: it learns, records every metric, is deterministic, turns a
non-finite loss into `diverged` and a broken hook into `failed`, and `l2cluster train` prints a table."""

from __future__ import annotations

import math
import re
import textwrap

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from support import config, params_of, registry, synthetic_splits

from l2cluster.cli import main
from l2cluster.plugin import Regularizer
from l2cluster.registry import Registry, load_builtins
from l2cluster.training.data import load_mnist, split_mnist
from l2cluster.training.trainer import Trainer, pack_key

SMALL = dict(model={"hidden_sizes": [64, 32]}, data={"batch_size": 32, "val_size": 100}, epochs=3,
             optimizer={"name": "adam", "lr": 3e-3})
EPOCH_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "weight_norm", "grad_norm",
              "clipped_steps", "skipped_steps", "epoch_s"}


@pytest.fixture(scope="module")
def tiny_splits(tiny_mnist_dir):
    return split_mnist(load_mnist(tiny_mnist_dir, download=False), val_size=100, seed=0)


def test_learns_and_records_every_metric(tiny_splits):
    trainer = Trainer([config(regularizers=[{"name": "l2", "strength": 1e-4}, {"name": "dropout", "p": 0.1}],
                              **SMALL)], tiny_splits, registry(), device="cpu")
    (result,) = trainer.fit()
    assert result.outcome == "succeeded"
    assert [m["epoch"] for m in result.epochs] == [1, 2, 3]
    for m in result.epochs:
        assert set(m) == EPOCH_KEYS | {"penalty_l2"}  # the mean of what the l2 plugin added to the loss
        assert all(math.isfinite(v) for v in m.values())
        # (λ/2)·Σ‖w‖² over the weight matrices, averaged over the epoch: below (λ/2)·‖θ‖² at the epoch's end
        # (biases included there, and the weights grew during the epoch), and not far below it.
        assert 0.3 * 0.5e-4 * m["weight_norm"] ** 2 < m["penalty_l2"] < 0.5e-4 * m["weight_norm"] ** 2
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]
    assert result.final["val_acc"] > 0.6 and result.final["test_acc"] > 0.6  # chance is 0.1
    assert result.final["best_epoch"] in (1, 2, 3)
    assert result.epochs[0]["lr"] == 3e-3


def test_same_seed_same_run_other_seed_other_run(tiny_splits):
    runs = []
    for seed in (4, 4, 5):
        t = Trainer([config(seed=seed, regularizers=[{"name": "dropout", "p": 0.2}], **SMALL)], tiny_splits,
                    registry(), device="cpu")
        result = t.fit()[0]
        runs.append((params_of(t), result))
    (p1, r1), (p2, r2), (p3, r3) = runs
    assert all(torch.equal(p1[n], p2[n]) for n in p1)
    assert [m["val_loss"] for m in r1.epochs] == [m["val_loss"] for m in r2.epochs]
    assert not torch.equal(p1["layers.0.weight"], p3["layers.0.weight"])
    assert r1.epochs[-1]["val_loss"] != r3.epochs[-1]["val_loss"]


def test_schedules_step_per_epoch_on_validation(tiny_splits):
    cfg = config(schedule={"name": "step", "step_size": 1, "gamma": 0.5}, **SMALL)
    (r,) = Trainer([cfg], tiny_splits, registry(), device="cpu").fit()
    assert [m["lr"] for m in r.epochs] == pytest.approx([3e-3, 1.5e-3, 7.5e-4])
    cfg = config(schedule={"name": "cosine"}, **SMALL)
    (r,) = Trainer([cfg], tiny_splits, registry(), device="cpu").fit()
    assert [m["lr"] for m in r.epochs] == pytest.approx([3e-3, 3e-3 * 0.75, 3e-3 * 0.25])
    cfg = config(schedule={"name": "plateau", "patience": 0, "factor": 0.5, "threshold": 10.0}, **SMALL)
    (r,) = Trainer([cfg], tiny_splits, registry(), device="cpu").fit()
    assert [m["lr"] for m in r.epochs] == pytest.approx([3e-3, 1.5e-3, 7.5e-4])  # never "improves" by 1000%


def test_nonfinite_loss_is_a_diverged_outcome_not_a_crash(tiny_splits):
    cfg = config(optimizer={"name": "sgd", "lr": 10.0}, regularizers=[{"name": "l2", "strength": 10.0}],
                 **{k: v for k, v in SMALL.items() if k != "optimizer"})
    (r,) = Trainer([cfg], tiny_splits, registry(), device="cpu").fit()
    assert r.outcome == "diverged"
    assert r.diverged_epoch == 1 and "epoch 1" in r.error
    assert r.final["test_acc"] is None and len(r.epochs) == 1


class _Raises(Regularizer):
    name = "raises"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def after_step(self, step):
        if step == 5:
            raise RuntimeError("boom at step 5")


class _WrongShape(Regularizer):
    name = "wrong_shape"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def penalty(self, params):
        return torch.zeros(3, 3)


@pytest.mark.parametrize("plugin, message", [
    (_Raises, "plugin 'raises', hook 'after_step': RuntimeError: boom at step 5"),
    (_WrongShape, "plugin 'wrong_shape', hook 'penalty': returned a tensor of shape (3, 3); "
                  "expected a tensor of shape (1,), one per model"),
])
def test_a_broken_hook_fails_the_job_with_the_plugins_message(tiny_splits, plugin, message):
    reg = Registry()
    load_builtins(reg)
    reg.register(plugin, "test")
    (r,) = Trainer([config(reg, regularizers=[{"name": plugin.name}], **SMALL)], tiny_splits, reg, device="cpu").fit()
    first, *trace = r.error.splitlines()
    assert r.outcome == "failed" and first == message
    if plugin is _Raises:  # an exception brings the plugin's own frames, file:line, and nothing of the trainer's
        line = _Raises.after_step.__code__.co_firstlineno + 2
        assert trace[0] == "Traceback (the plugin's frames, most recent call last):"
        assert trace[1] == f'  File "{__file__}", line {line}, in after_step'
        assert trace[2].strip() == 'raise RuntimeError("boom at step 5")' and len(trace) == 3
    else:  # a wrong return value has no traceback to show
        assert trace == []


def test_only_compatible_configs_stack():
    a = config(seed=1, regularizers=[{"name": "l2", "strength": 1e-3}])
    b = config(seed=2, regularizers=[{"name": "l2", "strength": 1e-4}])
    c = config(seed=2, regularizers=[{"name": "l2", "strength": 1e-4, "exclude_bias_and_1d": False}])
    d = config(seed=2, optimizer={"name": "adam", "lr": 2e-3}, regularizers=[{"name": "l2"}])
    e = config(seed=2, model={"tf32": True}, regularizers=[{"name": "l2", "strength": 1e-4}])  # other numbers
    assert pack_key(a) == pack_key(b) != pack_key(c) != pack_key(d)
    assert pack_key(e) != pack_key(b)
    with pytest.raises(ValueError, match="differ only in seed"):
        Trainer([a, c], synthetic_splits(), registry(), device="cpu")


def test_a_trainer_says_why_it_replays_no_cuda_graph():
    trainer = Trainer([config(**SMALL)], synthetic_splits(), registry(), device="cpu")
    assert not trainer.graphs and trainer.graphs_off_reason == "not on a CUDA device (cpu)"


def test_real_mnist_one_epoch_reaches_90_percent(shared_mnist_dir):
    if shared_mnist_dir is None:
        pytest.skip("../shared/data/mnist is not here")
    splits = split_mnist(load_mnist(shared_mnist_dir, download=False), val_size=5000, seed=0, train_size=10000)
    cfg = config(model={"hidden_sizes": [128]}, data={"batch_size": 64, "train_size": 10000},
                 optimizer={"name": "adam", "lr": 1e-3}, epochs=1)
    (r,) = Trainer([cfg], splits, registry(), device="cpu").fit()
    assert r.final["test_acc"] > 0.90


def test_cli_train_runs_every_job_and_prints_the_table(tiny_mnist_dir, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent("""
        name: cli-train
        model: {hidden_sizes: [32]}
        data: {batch_size: 50, val_size: 100}
        optimizer: {name: adam, lr: 0.003}
        epochs: 1
        regularizers: [{name: l2, strength: 0.0}]
        sweep:
          seeds: [0, 1]
          grid: {regularizers.l2.strength: [0.0, 1.0e-3]}
    """))
    assert main(["train", str(spec), "--data-dir", str(tiny_mnist_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"^[0-9a-f]{16}\s", line)]
    assert len(rows) == 4 and all("succeeded" in r for r in rows)
    assert re.search(r"strength=0.001\s+1\s+succeeded", out)


RESUMABLE = dict(model={"hidden_sizes": [48, 24]}, data={"batch_size": 32, "val_size": 100}, epochs=4,
                 optimizer={"name": "adamw", "lr": 3e-3, "weight_decay": 0.0}, schedule={"name": "cosine"},
                 regularizers=[{"name": "dropout", "p": 0.2}, {"name": "grad_clip", "max_norm": 1.0},
                               {"name": "decoupled_decay", "weight_decay": 0.05}])


def _comparable(result):
    """A RunResult without its wall-clock fields."""
    epochs = [{k: v for k, v in m.items() if k != "epoch_s"} for m in result.epochs]
    final = {k: v for k, v in result.final.items() if k != "train_s"}
    return result.outcome, epochs, final


def test_a_run_resumed_from_a_checkpoint_ends_exactly_like_an_uninterrupted_one(tiny_splits, tmp_path):
    cfgs = [config(seed=s, **RESUMABLE) for s in (1, 2)]
    whole = Trainer(cfgs, tiny_splits, registry(), device="cpu")
    expected = whole.fit()

    first = Trainer(cfgs, tiny_splits, registry(), device="cpu")
    ckpt = tmp_path / "epoch2.pt"

    def save_and_stop_after_2(epoch, metrics):
        if epoch == 2:
            torch.save(first.state_dict(), ckpt)

    calls = iter(range(10**6))
    first.fit(on_epoch=save_and_stop_after_2,
              should_stop=lambda: first.epochs_done >= 2 and next(calls) == 5)  # stop mid-epoch 3

    resumed = Trainer(cfgs, tiny_splits, registry(), device="cpu")
    resumed.load_state_dict(torch.load(ckpt, weights_only=False))
    assert resumed.epochs_done == 2
    got = resumed.fit()
    assert [_comparable(r) for r in got] == [_comparable(r) for r in expected]
    for name, p in whole.params.items():
        assert torch.equal(p, resumed.params[name]), name


def test_should_stop_cancels_within_one_step(tiny_splits):
    trainer = Trainer([config(**SMALL)], tiny_splits, registry(), device="cpu")
    asked = []

    def stop_at_7():
        asked.append(trainer.step_count)
        return trainer.step_count == 7

    (r,) = trainer.fit(should_stop=stop_at_7)
    assert r.outcome == "cancelled"
    assert trainer.step_count == 7 and asked == list(range(8))
    assert r.epochs == []


def test_a_checkpoint_from_another_stack_is_refused(tiny_splits):
    one = Trainer([config(**SMALL)], tiny_splits, registry(), device="cpu")
    two = Trainer([config(seed=s, **SMALL) for s in (0, 1)], tiny_splits, registry(), device="cpu")
    with pytest.raises(ValueError, match="checkpoint holds 1 models, this trainer 2"):
        two.load_state_dict(one.state_dict())


def test_evaluation_in_chunks_equals_one_pass(monkeypatch):
    """Evaluation splits examples × models into chunks to bound memory at large K; the numbers do not change."""
    import l2cluster.training.trainer as trainer_module

    trainer = Trainer([config(seed=s, model={"hidden_sizes": [16], "dtype": "float64"}) for s in (1, 2, 3)],
                      synthetic_splits(), registry(), device="cpu")
    whole = trainer.evaluate(trainer.val_x, trainer.val_y)
    monkeypatch.setattr(trainer_module, "_EVAL_ROWS", 3 * 5)  # max(64, 5): chunks of 64, then the rest
    chunked = trainer.evaluate(torch.cat([trainer.val_x] * 3), torch.cat([trainer.val_y] * 3))
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
