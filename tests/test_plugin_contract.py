"""The v2 hooks as a plugin author meets them: what they are offered, what they may return and the errors when a
return is wrong; and check_plugin failing, with the fix, for each mistake it exists to catch."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from support import config, registry_with, synthetic_splits

from l2cluster.plugin import HookError, Regularizer
from l2cluster.testing import PluginCheckError, check_plugin
from l2cluster.training.trainer import Trainer

SMALL = dict(data={"batch_size": 16, "val_size": 64}, epochs=1, model={"hidden_sizes": [12, 8], "dtype": "float64"})


class Strength(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strength: float = 0.01


def _train(plugin, settings=None, **fields):
    reg = registry_with(plugin)
    settings = settings or [{}]
    cfgs = [config(reg, seed=i, regularizers=[{"name": plugin.name, **s}], **{**SMALL, **fields})
            for i, s in enumerate(settings)]
    trainer = Trainer(cfgs, synthetic_splits(n_train=100), reg, device="cpu")
    return trainer, trainer.fit()


class ActivityL1(Regularizer):
    """λ·Σ|h| over every hidden unit's activation, per example (Keras' activity_regularizer)."""

    name = "activity_l1"
    Config = Strength

    def example_penalty(self, hidden, hp):
        return hp.strength.view(-1, 1) * sum(h.abs().sum(-1) for h in hidden)


def test_example_penalty_sees_hidden_activations_and_is_right_on_two_ranks():
    """The activity penalty that needed a gradient-injection trick and was 2× too strong on 2 ranks."""
    report = check_plugin(ActivityL1, [{"strength": 1e-3}, {"strength": 1e-2}])
    assert {"per-example terms", "DDP normalisation"} <= set(report.passed)
    assert "penalty_activity_l1" in report.metrics


class Offered(Regularizer):
    """Records what each hook is offered, into its per-job state (so the test can read it)."""

    name = "offered"
    Config = Strength

    def init_state(self, params, ctx):
        return {"calls": torch.zeros(ctx.num_models, 4, dtype=torch.long, device=ctx.device)}

    def on_batch(self, x, targets, ctx, state):
        assert x.shape == (ctx.num_models, ctx.global_batch, 784) and targets.dtype == torch.long
        state["calls"][:, 0] += 1
        return None

    def example_penalty(self, logits, targets, hidden, ctx, state):
        assert logits.shape == (ctx.num_models, ctx.local_batch, ctx.num_classes)
        assert [h.shape[-1] for h in hidden] == [12, 8] and ctx.steps_per_epoch == 7
        state["calls"][:, 1] += 1
        return torch.zeros(logits.shape[:2], dtype=logits.dtype)

    def after_step(self, params, state, rng):
        state["calls"][:, 2] += 1
        assert rng.normal(3).shape == (state["calls"].shape[0], 3)

    def eval_params(self, params, state):
        state["calls"][:, 3] += 1
        return None


def test_every_hook_is_offered_what_the_contract_says():
    trainer, (result,) = _train(Offered, epochs=2)
    assert result.outcome == "succeeded", result.error
    # 100 examples at batch 16: 7 steps an epoch (the last of 4), 2 epochs; evaluated on validation twice, test once.
    assert trainer.plugins[0].state["calls"][0].tolist() == [14, 14, 14, 3]
    assert result.epochs[0]["penalty_offered"] == 0


def _plugin(hook: str, fn):
    return type("Bad", (Regularizer,), {"name": "bad", "Config": Strength, hook: fn})


@pytest.mark.parametrize("hook, fn, message", [
    ("on_batch", lambda self, x, targets: (x[:, :3], targets), "on_batch': returned x of shape"),
    ("on_batch", lambda self, x, targets: (x, targets.float()), "expected class indices"),
    ("on_batch", lambda self, x: x, "expected (x, targets) or None"),
    ("example_penalty", lambda self, logits: logits.sum(-1).sum(-1), "expected a tensor of shape (1, 16)"),
    ("eval_params", lambda self, params: {"layers.0.weight": torch.zeros(3)},
     "eval_params': returned 'layers.0.weight'"),
    ("after_step", lambda self, state: None, "takes `state` but the plugin has no init_state"),
    ("init_state", lambda self, params: {"x": torch.zeros(3)}, "expected a tensor with the model axis first"),
])
def test_a_wrong_return_fails_the_job_naming_the_plugin_hook_and_what_was_expected(hook, fn, message):
    plugin = _plugin(hook, fn)
    if hook == "init_state":
        plugin.after_step = lambda self, state: None
    try:
        _, (result, *_) = _train(plugin, [{}, {}] if hook == "init_state" else None)
    except HookError as e:  # raised while the trainer is built (init_state): nothing trained
        assert message in str(e)
        return
    assert result.outcome == "failed" and message in result.error


class KeepsInstanceState(Regularizer):
    """Wrong: a step counter on the instance (shared by every job of the process, lost on resume)."""

    name = "instance_state"
    Config = Strength
    steps = 0

    def penalty(self, params, hp):
        type(self).steps += 1
        return hp.strength * type(self).steps * params["layers.0.bias"].pow(2).sum(1)


class MixesModels(Regularizer):
    """Wrong: a penalty on the mean over the model axis, so each model's loss depends on the others."""

    name = "mixes_models"
    Config = Strength

    def penalty(self, params, hp):
        return hp.strength * params["layers.0.weight"].pow(2).mean(0).sum().expand(hp.strength.shape)


class BatchStatistic(Regularizer):
    """Wrong: a per-example term built from the batch's mean logit (differs with the shard a rank holds)."""

    name = "batch_statistic"
    Config = Strength

    def example_penalty(self, logits, hp):
        return hp.strength.view(-1, 1) * logits.mean(1, keepdim=True).pow(2).sum(-1).expand(logits.shape[:2])


class PerRankPenalty(Regularizer):
    """Wrong: scales a penalty with the rank's share of the batch, so 2 ranks add half of it."""

    name = "per_rank"
    Config = Strength

    def penalty(self, params, hp, ctx):
        return hp.strength * ctx.local_batch / 16 * params["layers.0.weight"].pow(2).flatten(1).sum(1)


@pytest.mark.parametrize("plugin, failed", [
    (KeepsInstanceState, "determinism: two runs with the same seeds differ"),
    (MixesModels, "K-independence: model 0 trained stacked with 2 models differs"),
    (BatchStatistic, "per-example terms: an example's term depends on the other examples"),
    (PerRankPenalty, "DDP normalisation: 2 gloo ranks differ from 1 process"),
])
def test_check_plugin_catches_each_mistake_it_is_for(plugin, failed):
    with pytest.raises(PluginCheckError) as e:
        check_plugin(plugin, [{"strength": 0.01}, {"strength": 0.1}])
    assert failed in str(e.value)


def test_an_init_state_that_raises_fails_its_job_and_the_others_train(tmp_path, tiny_mnist_dir, capsys):
    from l2cluster.cli import main

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "needs_gpu.py").write_text(
        "import torch\nfrom pydantic import BaseModel, ConfigDict\nfrom l2cluster.plugin import Regularizer\n\n\n"
        "class NeedsGpu(Regularizer):\n    name = 'needs_gpu'\n\n"
        "    class Config(BaseModel):\n        model_config = ConfigDict(extra='forbid')\n        fail: bool = True\n\n"
        "    def init_state(self, params, hp):\n        if hp.fail:\n            raise RuntimeError('no GPU here')\n"
        "        return {'n': torch.zeros(len(next(iter(params.values()))))}\n\n"
        "    def after_step(self, state):\n        state['n'] += 1\n")
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nmodel: {hidden_sizes: [8]}\ndata: {batch_size: 100, val_size: 100}\nepochs: 1\n"
                    "optimizer: {name: adam, lr: 0.01}\nregularizers: [{name: needs_gpu}]\n"
                    "sweep: {variants: [{label: ok, set: {regularizers.needs_gpu.fail: false}}, {label: bad}]}\n")
    code = main(["--plugin-dir", str(tmp_path / "plugins"), "train", str(spec), "--data-dir", str(tiny_mnist_dir),
                 "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 1
    rows = {line.split()[1]: line for line in out.splitlines() if line.split()[1:2] in (["ok"], ["bad"])}
    assert " succeeded " in rows["ok"]
    # The error column: the message's first line, cut to 60 characters.
    assert " failed " in rows["bad"]
    assert rows["bad"].endswith("plugin 'needs_gpu', hook 'init_state': RuntimeError: no GPU…")
