"""Broken plugins at training time: a hook that returns NaN, makes gradients or parameters NaN, or returns the
wrong kind of tensor fails that job (outcome "failed", naming the plugin and the hook) — not "diverged", which
stays for a loss that overflows on its own — and other models trained alongside are untouched."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support import AtStep, InfPenalty, NanPenalty, config, params_of, synthetic_splits

from l2cluster.plugin import Regularizer
from l2cluster.registry import Registry, load_builtins
from l2cluster.training.trainer import Trainer

NAN = float("nan")
# 320 training examples at batch 32: 10 steps per epoch.
SMALL = dict(model={"hidden_sizes": [16], "dtype": "float64"}, data={"batch_size": 32, "val_size": 64}, epochs=3,
             optimizer={"name": "adam", "lr": 1e-2})
STEPS_PER_EPOCH = 10


_Cfg = AtStep


class NanActivation(Regularizer):
    name = "nan_activation"
    Config = _Cfg

    def on_activation(self, x, hp):
        return x * NAN if float(hp.at_step[0]) < 0 else x  # at_step < 0: always


class NanGradients(Regularizer):
    name = "nan_gradients"
    Config = _Cfg

    def on_gradients(self, params, hp, step):
        if step == int(hp.at_step[0]):
            params["layers.0.weight"].grad[:, 0, 0] = NAN


class NanBeforeStep(Regularizer):
    name = "nan_before_step"
    Config = _Cfg

    @torch.no_grad()
    def before_step(self, params, hp, step):
        if step == int(hp.at_step[0]):
            params["layers.0.bias"][:, 0] = NAN


class NanAfterStep(Regularizer):
    name = "nan_after_step"
    Config = _Cfg

    @torch.no_grad()
    def after_step(self, params, hp, step):
        bad = (hp.at_step == step).view(-1, 1)
        params["layers.1.bias"].copy_(torch.where(bad, torch.full_like(params["layers.1.bias"], NAN),
                                                  params["layers.1.bias"]))


class IntPenalty(Regularizer):
    name = "int_penalty"
    Config = _Cfg

    def penalty(self, params):
        return torch.zeros(1, dtype=torch.long)


PLUGINS = (NanPenalty, InfPenalty, NanActivation, NanGradients, NanBeforeStep, NanAfterStep, IntPenalty)


def _registry() -> Registry:
    reg = Registry()
    load_builtins(reg)
    for plugin in PLUGINS:
        reg.register(plugin, "test")
    return reg


REG = _registry()


def _fit(*configs):
    trainer = Trainer(list(configs), synthetic_splits(), REG, device="cpu")
    return trainer, trainer.fit()


def _cfg(plugin: str, at_step: int, **fields):
    return config(REG, regularizers=[{"name": plugin, "at_step": at_step}], **{**SMALL, **fields})


@pytest.mark.parametrize("plugin, hook, made", [
    ("nan_penalty", "penalty", "returned NaN from finite parameters"),
    ("nan_gradients", "on_gradients", "made the gradients NaN"),
    ("nan_before_step", "before_step", "made the parameters NaN"),
    ("nan_after_step", "after_step", "made the parameters NaN"),
])
def test_a_hook_that_makes_numbers_nan_fails_the_job_naming_plugin_and_hook(plugin, hook, made):
    at = STEPS_PER_EPOCH + 3  # the 4th step of epoch 2
    _, (r,) = _fit(_cfg(plugin, at))
    assert r.outcome == "failed" and r.diverged_epoch is None
    assert r.error == f"plugin {plugin!r}, hook {hook!r}: {made} in epoch 2, step 4 of the epoch"
    assert len(r.epochs) == 2 and r.final["test_acc"] is None  # epoch 1 is kept; nothing after


def test_an_activation_hook_that_returns_nan_fails_the_job():
    _, (r,) = _fit(_cfg("nan_activation", -1))
    assert (r.outcome, r.error) == ("failed", "plugin 'nan_activation', hook 'on_activation': returned NaN "
                                              "activations from finite inputs in epoch 1, step 1 of the epoch")


def test_an_overflow_is_still_a_divergence():
    # inf can be an honest overflow of a large but finite model (the L2 term of exploding weights): "diverged".
    _, (r,) = _fit(_cfg("inf_penalty", 4))
    assert (r.outcome, r.diverged_epoch) == ("diverged", 1) and r.error == "loss became non-finite in epoch 1"
    # …and so is a learning rate that blows the weights up, with an L2 plugin present.
    _, (r,) = _fit(config(REG, **{**SMALL, "optimizer": {"name": "sgd", "lr": 10.0}, "model": {"hidden_sizes": [16]}},
                          regularizers=[{"name": "l2", "strength": 10.0}]))
    assert (r.outcome, r.diverged_epoch) == ("diverged", 1)


def test_only_the_model_whose_hook_went_nan_fails_and_the_others_are_untouched():
    """Stacked: model 1's penalty goes NaN in epoch 2; model 0 trains on exactly as if nothing happened (the
    replay that finds the culprit puts every parameter and optimizer state back)."""
    hit = _cfg("nan_penalty", STEPS_PER_EPOCH + 5, seed=2)
    fine = _cfg("nan_penalty", 10**9, seed=1)
    stacked, (r0, r1) = _fit(fine, hit)
    assert r0.outcome == "succeeded" and len(r0.epochs) == 3
    assert r1.outcome == "failed" and "epoch 2, step 6 of the epoch" in r1.error
    alone, (a0, _) = _fit(fine, _cfg("nan_penalty", 10**9, seed=2))  # the same stack where nothing goes wrong
    assert params_of(stacked, 0).keys() == params_of(alone, 0).keys()
    for name, p in params_of(alone, 0).items():
        assert torch.equal(params_of(stacked, 0)[name], p), name
    assert r0.epochs[-1]["val_loss"] == a0.epochs[-1]["val_loss"]


def test_a_penalty_of_the_wrong_kind_fails_the_job():
    _, (r,) = _fit(_cfg("int_penalty", 0))
    assert r.outcome == "failed"
    assert r.error == ("plugin 'int_penalty', hook 'penalty': returned a torch.int64 tensor on cpu; expected a "
                       "floating-point tensor on cpu")


class RankNan(Regularizer):
    """NaN activations on rank 1 only, from the 3rd step: rank 0 sees nothing wrong until the all-reduce."""

    name = "rank_nan"
    Config = _Cfg

    def on_gradients(self, params):  # a gradient hook keeps the step eager and the rank's view honest
        pass

    def on_activation(self, x, hp):
        return x * NAN if dist.get_rank() == 1 and bool(hp.at_step[0] >= 0) and _steps_seen(x) else x


_SEEN = {"calls": 0}


def _steps_seen(x) -> bool:
    _SEEN["calls"] += 1
    return _SEEN["calls"] > 2


def _rank_main(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        reg = Registry()
        load_builtins(reg)
        reg.register(RankNan, "test")
        cfg = config(reg, regularizers=[{"name": "rank_nan", "at_step": 0}], **SMALL)
        (r,) = Trainer([cfg], synthetic_splits(), reg, device="cpu").fit()
        torch.save({"outcome": r.to_dict()["outcome"], "error": r.error}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as in test_ddp.py: skip gloo's racy interpreter teardown


def test_ddp_ranks_agree_on_the_plugin_to_blame(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0] == results[1]
    assert results[0]["outcome"] == "failed"
    assert results[0]["error"].startswith("plugin 'rank_nan', hook 'on_activation': returned NaN activations")


def test_broken_installed_plugins_are_listed_with_the_reason_and_the_rest_load(tmp_path, monkeypatch):
    """Entry points of installed packages (found by importlib.metadata on sys.path): one that fails to import is
    unavailable, one that is not a Regularizer is refused; the built-ins and the good one still load."""
    dist = tmp_path / "l2cluster_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: l2cluster-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[l2cluster.regularizers]\nbroken = l2c_broken_import:Plugin\nnotreg = l2c_not_a_plugin:Thing\n"
        "good = l2c_good:Good\n")
    (tmp_path / "l2c_broken_import.py").write_text("raise ImportError('needs libfoo.so')\n")
    (tmp_path / "l2c_not_a_plugin.py").write_text("class Thing:\n    name = 'notreg'\n")
    (tmp_path / "l2c_good.py").write_text(
        "from pydantic import BaseModel, ConfigDict\nfrom l2cluster.plugin import Regularizer\n\n"
        "class Good(Regularizer):\n    name = 'good'\n\n    class Config(BaseModel):\n"
        "        model_config = ConfigDict(extra='forbid')\n\n    def after_step(self, params):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from l2cluster.registry import load_registry

    reg = load_registry()
    assert {"l2", "dropout", "grad_clip", "decoupled_decay", "good"} <= set(reg.names)
    problems = {p.name: (p.status, p.reason) for p in reg.problems}
    assert problems["broken"] == ("unavailable", "import failed: ImportError: needs libfoo.so")
    assert problems["notreg"][0] == "refused" and "is not a subclass of l2cluster.plugin.Regularizer" in \
        problems["notreg"][1]
