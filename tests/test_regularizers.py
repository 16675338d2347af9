"""The built-in regularizers are what they claim to be: equivalences with torch's optimizers, clipping,
dropout and exclusion semantics, and stacked (K>1) training equal to separate runs."""

from __future__ import annotations

import math

import pytest
import torch
from support import InfGradients, config, params_of, registry, registry_with, synthetic_splits

from l2cluster.plugin import HyperParams, Regularizer, StackedRNG
from l2cluster.registry import Registry, load_builtins
from l2cluster.training.skipping import stacked_state
from l2cluster.training.trainer import Trainer

# 320 examples at batch 16: one epoch is 20 optimizer steps.
STEPS_20 = dict(data={"batch_size": 16, "val_size": 64}, epochs=1, model={"hidden_sizes": [32, 16], "dtype": "float64"})


def train(cfgs, splits=None, reg=None, skip_on_host=True):
    trainer = Trainer(cfgs if isinstance(cfgs, list) else [cfgs], splits or synthetic_splits(), reg or registry(),
                      device="cpu")
    # False: skip models by the device-side mask that a GPU uses (no host read), instead of the CPU's host check.
    trainer.skip_on_host = skip_on_host
    results = trainer.fit()
    return trainer, results


def max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def test_sgd_with_l2_term_equals_sgd_weight_decay():
    lam = 0.05
    sgd = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
    with_term, _ = train(config(optimizer=sgd, regularizers=[
        {"name": "l2", "strength": lam, "exclude_bias_and_1d": False}], **STEPS_20))
    with_wd, _ = train(config(optimizer={**sgd, "weight_decay": lam}, **STEPS_20))
    plain, _ = train(config(optimizer=sgd, **STEPS_20))
    assert with_term.step_count == 20
    assert max_diff(params_of(with_term), params_of(with_wd)) < 1e-12
    assert max_diff(params_of(with_term), params_of(plain)) > 1e-4  # the decay did something


def test_adam_with_decoupled_decay_equals_adamw():
    wd = 0.1
    adam = {"name": "adam", "lr": 1e-2}
    decoupled, _ = train(config(optimizer=adam, regularizers=[
        {"name": "decoupled_decay", "weight_decay": wd, "exclude_bias_and_1d": False}], **STEPS_20))
    adamw, _ = train(config(optimizer={**adam, "name": "adamw", "weight_decay": wd}, **STEPS_20))
    plain, _ = train(config(optimizer=adam, **STEPS_20))
    assert max_diff(params_of(decoupled), params_of(adamw)) < 1e-12
    assert max_diff(params_of(decoupled), params_of(plain)) > 1e-4


def test_adam_with_l2_term_is_not_adamw():
    """Why both plugins exist: Adam divides the L2 term's gradient λw by √v per coordinate, so weights with
    large gradients are barely decayed. AdamW shrinks every weight by lr·wd regardless (Loshchilov & Hutter)."""
    lam = 0.1
    adam = {"name": "adam", "lr": 1e-2}
    coupled, _ = train(config(optimizer=adam, regularizers=[
        {"name": "l2", "strength": lam, "exclude_bias_and_1d": False}], **STEPS_20))
    adamw, _ = train(config(optimizer={**adam, "name": "adamw", "weight_decay": lam}, **STEPS_20))
    assert max_diff(params_of(coupled), params_of(adamw)) > 1e-3


def _clip_plugin():
    return registry().get("grad_clip")


def _stacked_grads(scales):
    torch.manual_seed(0)
    params = {"w": torch.randn(len(scales), 6, 4, dtype=torch.float64),
              "b": torch.randn(len(scales), 4, dtype=torch.float64)}
    for p in params.values():
        p.grad = torch.randn_like(p) * torch.tensor(scales, dtype=p.dtype).view(-1, *[1] * (p.dim() - 1))
    return params


def _norms(params):
    return torch.stack([p.grad.flatten(1).norm(dim=1) for p in params.values()]).norm(dim=0)


def test_grad_clip_norm_is_per_model_and_leaves_small_gradients_alone():
    info = _clip_plugin()
    cfg = info.config_model(name="grad_clip", mode="norm", max_norm=1.0)
    params = _stacked_grads([10.0, 0.01, 3.0])
    before = {n: p.grad.clone() for n, p in params.items()}
    hp = HyperParams([cfg] * 3, dtype=torch.float64, device="cpu")
    out = info.hooks["on_gradients"](params=params, hp=hp)
    after = _norms(params)
    assert float(after[0]) == pytest.approx(1.0, rel=1e-5) and float(after[2]) == pytest.approx(1.0, rel=1e-5)
    assert torch.all(after <= 1.0 + 1e-6)
    for n, p in params.items():  # the small model's gradient is untouched, bit for bit
        assert torch.equal(p.grad[1], before[n][1])
    assert out["clipped"].tolist() == [True, False, True]
    assert out["skip"].tolist() == [False, False, False]


def test_grad_clip_value_clamps_elementwise():
    info = _clip_plugin()
    cfg = info.config_model(name="grad_clip", mode="value", max_value=0.5)
    params = _stacked_grads([3.0, 0.01])
    before = {n: p.grad.clone() for n, p in params.items()}
    out = info.hooks["on_gradients"](params=params, hp=HyperParams([cfg] * 2, dtype=torch.float64, device="cpu"))
    for n, p in params.items():
        assert float(p.grad.abs().max()) <= 0.5
        assert torch.equal(p.grad, before[n].clamp(-0.5, 0.5))
    assert out["clipped"].tolist() == [True, False]  # counted before the clamp, which leaves nothing above it


@pytest.mark.parametrize("skip_on_host", [True, False], ids=["host_check", "device_mask"])
def test_grad_clip_nonfinite_norm_skips_only_that_model(skip_on_host):
    """A model whose gradient turns inf skips its step (counted); its stack-mate trains normally."""

    class Poison(Regularizer):
        name = "poison"

        class Config(__import__("pydantic").BaseModel):
            model_config = {"extra": "forbid"}
            poisoned: float = 0.0

        def on_gradients(self, params, hp, step):
            if step in (0, 3):  # the first step too, before the optimizer has any state
                for p in params.values():
                    p.grad[hp.poisoned > 0] = float("inf")

    reg = Registry()
    load_builtins(reg)
    reg.register(Poison, "test")
    for optimizer in ({"name": "sgd", "lr": 0.1, "momentum": 0.9}, {"name": "adam", "lr": 1e-2}):
        cfgs = [config(reg, regularizers=[{"name": "poison", "poisoned": float(s)},
                                          {"name": "grad_clip", "max_norm": 1.0}],
                       seed=s, optimizer=optimizer, **STEPS_20) for s in (0, 1)]
        singles = [train(c, reg=reg, skip_on_host=skip_on_host)[0] for c in cfgs]
        stacked, results = train(cfgs, reg=reg, skip_on_host=skip_on_host)
        assert [r.epochs[0]["skipped_steps"] for r in results] == [0, 2]
        assert [r.outcome for r in results] == ["succeeded", "succeeded"]
        # Model 0 is unaffected by model 1's bad steps.
        assert max_diff(params_of(stacked, 0), params_of(singles[0], 0)) < 1e-12
        if optimizer["name"] == "sgd":  # model 1 equals its own single run, which skipped the same steps
            assert max_diff(params_of(stacked, 1), params_of(singles[1], 0)) < 1e-12
        else:
            # Adam's step count is shared by the stack, so model 1's bias correction runs 2 steps ahead of its
            # single run (documented in Trainer._snapshot); what must hold is that its state was not poisoned.
            assert all(torch.isfinite(p).all() for p in params_of(stacked, 1).values())
            assert all(torch.isfinite(v).all() for s in stacked.optimizer.state.values() for v in s.values())


def test_grad_clip_can_fail_the_job_instead():
    class PoisonAll(Regularizer):
        name = "poison_all"

        class Config(__import__("pydantic").BaseModel):
            model_config = {"extra": "forbid"}

        def on_gradients(self, params):
            for p in params.values():
                p.grad.fill_(float("nan"))

    reg = Registry()
    load_builtins(reg)
    reg.register(PoisonAll, "test")
    cfg = config(reg, regularizers=[{"name": "poison_all"}, {"name": "grad_clip", "on_nonfinite": "fail"}], **STEPS_20)
    _, results = train(cfg, reg=reg)
    assert results[0].outcome == "failed"
    assert "grad_clip" in results[0].error and "not finite" in results[0].error


SKIPS = dict(sgd={"name": "sgd", "lr": 0.1, "momentum": 0.9}, adam={"name": "adam", "lr": 1e-2})


def _skipping(reg, optimizer, when):
    """One model per entry of `when` (InfGradients: 0 never, 1 on about half the steps, 2 always), with grad_clip
    skipping the steps whose gradients are inf, and an L2 term and decoupled decay that must be undone too."""
    return [config(reg, seed=k, optimizer=optimizer, regularizers=[
        {"name": "inf_gradients", "when": w}, {"name": "l2", "strength": 1e-3},
        {"name": "decoupled_decay", "weight_decay": 0.1}, {"name": "grad_clip", "max_norm": 1.0}], **STEPS_20)
        for k, w in enumerate(when)]


@pytest.mark.parametrize("skip_on_host", [True, False], ids=["host_check", "device_mask"])
@pytest.mark.parametrize("optimizer", SKIPS.values(), ids=SKIPS.keys())
def test_a_model_skipped_on_every_step_keeps_its_parameters_and_optimizer_state(optimizer, skip_on_host):
    reg = registry_with(InfGradients)
    cfgs = _skipping(reg, optimizer, when=(0, 2))
    init = Trainer(cfgs, synthetic_splits(), reg, device="cpu")
    trainer, results = train(cfgs, reg=reg, skip_on_host=skip_on_host)
    assert [r.epochs[0]["skipped_steps"] for r in results] == [0, 20]
    assert all(torch.equal(p, params_of(init, 1)[n]) for n, p in params_of(trainer, 1).items())
    assert max_diff(params_of(trainer, 0), params_of(init, 0)) > 1e-3  # its stack-mate trained
    for p in trainer.params.values():
        state = stacked_state(trainer.optimizer, p, trainer.K)
        assert state and all(not s[1].any() and s[0].abs().sum() > 0 for s in state)


@pytest.mark.parametrize("when", [(0, 1, 2), (1,), (2,), (2, 2)])
@pytest.mark.parametrize("optimizer", SKIPS.values(), ids=SKIPS.keys())
def test_the_gpus_device_side_skip_mask_gives_the_host_checks_numbers_bit_for_bit(optimizer, when):
    """The CPU reads the skip mask on the host and steps only when some model may; a GPU always steps and puts
    the skipped models back by torch.where (no host read, so it runs inside a CUDA graph). Same numbers,
    including Adam's step count, shared by the stack, when every model skipped."""
    reg = registry_with(InfGradients)
    runs = []
    for skip_on_host in (True, False):
        trainer, results = train(_skipping(reg, optimizer, when), reg=reg, skip_on_host=skip_on_host)
        epochs = [[{k: v for k, v in m.items() if k != "epoch_s"} for m in r.epochs] for r in results]
        steps = max((int(s.get("step", 0)) for s in trainer.optimizer.state.values()), default=0)
        runs.append((params_of(trainer), epochs, steps))
    (params_host, epochs_host, steps_host), (params_mask, epochs_mask, steps_mask) = runs
    assert all(torch.equal(p, params_mask[n]) for n, p in params_host.items())
    assert epochs_host == epochs_mask and steps_host == steps_mask
    for w, m in zip(when, epochs_host):  # never, some of the 20 steps (data-dependent), all of them
        assert {0: lambda n: n == 0, 1: lambda n: 0 < n < 20, 2: lambda n: n == 20}[w](m[0]["skipped_steps"])
    if optimizer["name"] == "adam":  # counts the steps where some model stepped (here: the least-skipped one's)
        assert steps_host == 20 - min(m[0]["skipped_steps"] for m in epochs_host)


def test_dropout_changes_outputs_in_training_only():
    info = registry().get("dropout")
    cfg = info.config_model(name="dropout", p=0.3)
    hp = HyperParams([cfg], dtype=torch.float32, device="cpu")
    rng = StackedRNG([0], "cpu")
    x = torch.ones(1, 2000, 50)
    y = info.hooks["on_activation"](x=x, layer=0, num_layers=2, hp=hp, rng=rng)
    dropped = float((y == 0).float().mean())
    assert dropped == pytest.approx(0.3, abs=0.01)
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.7))  # inverted dropout keeps the expectation

    trainer = Trainer([config(regularizers=[{"name": "dropout", "p": 0.5}], **STEPS_20)], synthetic_splits(),
                      registry(), device="cpu")
    xb = trainer.val_x[:32].unsqueeze(0)
    train_out = trainer.model(xb, trainer.hooks.on_activation)
    eval_out = trainer.model(xb)
    assert not torch.allclose(train_out, eval_out)
    loss_a, acc_a = trainer.evaluate(trainer.val_x, trainer.val_y)
    loss_b, acc_b = trainer.evaluate(trainer.val_x, trainer.val_y)
    assert torch.equal(loss_a, loss_b)  # evaluation never drops anything


def test_excluded_biases_are_untouched_by_l2_and_decoupled_decay():
    params = {"layers.0.weight": torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True),
              "layers.0.bias": torch.randn(2, 3, dtype=torch.float64, requires_grad=True)}
    l2 = registry().get("l2")
    hp = HyperParams([l2.config_model(name="l2", strength=0.5)] * 2, dtype=torch.float64, device="cpu")
    pen = l2.hooks["penalty"](params=params, hp=hp)
    pen.sum().backward()
    assert params["layers.0.bias"].grad is None
    assert torch.allclose(params["layers.0.weight"].grad, 0.5 * params["layers.0.weight"])
    expected = 0.25 * params["layers.0.weight"].detach().pow(2).flatten(1).sum(1)
    assert torch.allclose(pen, expected)

    dd = registry().get("decoupled_decay")
    hp = HyperParams([dd.config_model(name="decoupled_decay", weight_decay=0.1)] * 2, dtype=torch.float64, device="cpu")
    w, b = params["layers.0.weight"].detach().clone(), params["layers.0.bias"].detach().clone()
    lr = torch.tensor([0.5, 0.25], dtype=torch.float64)
    with torch.no_grad():
        dd.hooks["before_step"](params={k: v.detach() for k, v in params.items()}, hp=hp, lr=lr)
    assert torch.equal(params["layers.0.bias"].detach(), b)
    assert torch.allclose(params["layers.0.weight"].detach(), w * (1 - lr * 0.1).view(2, 1, 1))


def test_stacked_models_equal_separate_runs():
    """K=2 trained together ≡ two K=1 runs with the same seeds and strengths (init, batch order, dropout)."""
    cfgs = [config(optimizer={"name": "adam", "lr": 1e-2}, seed=seed, epochs=2, regularizers=[
        {"name": "l2", "strength": strength}, {"name": "dropout", "p": p},
        {"name": "grad_clip", "max_norm": 2.0}], **{k: v for k, v in STEPS_20.items() if k != "epochs"})
        for seed, strength, p in ((3, 1e-3, 0.1), (7, 1e-2, 0.3))]
    stacked, stacked_results = train(cfgs)
    for k, cfg in enumerate(cfgs):
        single, single_results = train(cfg)
        assert max_diff(params_of(stacked, k), params_of(single, 0)) < 1e-10
        for a, b in zip(stacked_results[k].epochs, single_results[0].epochs):
            for key in ("train_loss", "val_loss", "val_acc", "weight_norm", "grad_norm", "clipped_steps"):
                assert math.isclose(a[key], b[key], rel_tol=1e-9, abs_tol=1e-12), key
    assert max_diff(params_of(stacked, 0), params_of(stacked, 1)) > 1e-3  # they really are different models
