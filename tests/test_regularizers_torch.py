"""The contract-v2 built-ins against PyTorch's own implementations: l1, label_smoothing, max_norm and ema each train
the numbers a plain nn.Sequential loop gets with torch's function for it; mixup draws λ ~ Beta(α, α) and its
soft-target loss is λ·CE(y) + (1 − λ)·CE(y[π]). Each also passes l2cluster.testing.check_plugin."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from l2cluster.plugins.ema import EMA
from l2cluster.plugins.l1 import L1
from l2cluster.plugins.label_smoothing import LabelSmoothing
from l2cluster.plugins.max_norm import MaxNorm
from l2cluster.plugins.mixup import Mixup
from support import config, params_of, registry, synthetic_splits
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from l2cluster.plugin import HyperParams, StackedRNG, TrainContext
from l2cluster.testing import check_plugin
from l2cluster.training.trainer import Trainer, derive_seed

# 320 examples at batch 16: one epoch is 20 SGD steps.
SETUP = dict(data={"batch_size": 16, "val_size": 64}, model={"hidden_sizes": [32, 16], "dtype": "float64"},
             optimizer={"name": "sgd", "lr": 0.1}, seed=4)


def reference(trainer: Trainer, epochs: int, loss_fn, after_step=None):
    """Train what `trainer` (K = 1, not yet fitted) would, as a plain nn.Sequential with torch.optim.SGD: the same
    initial weights, batches and learning rate; `loss_fn(model, logits, y)` is the loss; `after_step(model)` runs
    after every optimizer step."""
    layers = []
    for name, w in ((n, p) for n, p in trainer.params.items() if n.endswith("weight")):
        linear = nn.Linear(w.shape[1], w.shape[2], dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w.detach()[0].t())  # our [K, in, out] is nn.Linear's [out, in] transposed
            linear.bias.copy_(trainer.params[name.replace("weight", "bias")].detach()[0])
        layers += [linear, nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=trainer.cfg.optimizer.lr)
    order = torch.Generator().manual_seed(derive_seed(trainer.cfg.seed, "order"))
    x, y, batch = trainer.train_x, trainer.train_y, trainer.cfg.data.batch_size
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=order)
        for s in range(0, len(y), batch):
            idx = perm[s:s + batch]
            opt.zero_grad()
            loss_fn(model, model(x[idx]), y[idx]).backward()
            opt.step()
            if after_step is not None:
                after_step(model)
    return model


def assert_same_weights(trainer: Trainer, model: nn.Sequential, params=None, tol=1e-10):
    params = params if params is not None else params_of(trainer, 0)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for i, linear in enumerate(linears):
        w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
        assert torch.allclose(w.t(), linear.weight.detach(), rtol=0, atol=tol), i
        assert torch.allclose(b, linear.bias.detach(), rtol=0, atol=tol), i


def weights(model):
    return [m.weight for m in model if isinstance(m, nn.Linear)]


def test_l1_is_lambda_times_torchs_l1_norm_of_the_weights():
    lam = 1e-3
    trainer = Trainer([config(regularizers=[{"name": "l1", "strength": lam}], epochs=1, **SETUP)], synthetic_splits(),
                      registry(), device="cpu")
    ref = reference(trainer, 1, lambda m, logits, y: F.cross_entropy(logits, y) + lam * sum(
        torch.linalg.vector_norm(w, ord=1) for w in weights(m)))
    (result,) = trainer.fit()
    assert_same_weights(trainer, ref)
    # The reported penalty is λ·Σ|w| (weights only) as the plugin added it, averaged over the epoch's steps.
    assert 0 < result.epochs[0]["penalty_l1"] < lam * sum(float(w.detach().abs().sum()) for w in weights(ref)) * 1.2


@pytest.mark.parametrize("epsilon", [0.1, 0.4])
def test_label_smoothing_is_torchs_cross_entropy_with_label_smoothing(epsilon):
    trainer = Trainer([config(regularizers=[{"name": "label_smoothing", "epsilon": epsilon}], epochs=1, **SETUP)],
                      synthetic_splits(), registry(), device="cpu")
    ref = reference(trainer, 1, lambda m, logits, y: F.cross_entropy(logits, y, label_smoothing=epsilon))
    (result,) = trainer.fit()
    assert_same_weights(trainer, ref)
    # train_loss stays the plain cross-entropy; the smoothing's share is its own metric.
    assert result.epochs[0]["penalty_label_smoothing"] > 0


def test_label_smoothing_on_soft_targets_is_torchs():
    """After mixup the targets are probabilities; torch smooths those the same way."""
    plugin = registry().get("label_smoothing")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 10, generator=g, dtype=torch.float64)
    soft = torch.softmax(torch.randn(2, 5, 10, generator=g, dtype=torch.float64), -1)
    hp = HyperParams([plugin.config_model(name="label_smoothing", epsilon=e) for e in (0.1, 0.3)],
                     dtype=torch.float64, device="cpu")
    term = plugin.hooks["example_penalty"](logits=logits, targets=soft, hp=hp)
    for k, eps in enumerate((0.1, 0.3)):
        ours = F.cross_entropy(logits[k], soft[k], reduction="none") + term[k]
        theirs = F.cross_entropy(logits[k], soft[k], reduction="none", label_smoothing=eps)
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_max_norm_is_torch_renorm_of_every_units_incoming_weights():
    c = 0.6
    trainer = Trainer([config(regularizers=[{"name": "max_norm", "max_norm": c}], epochs=1, **SETUP)],
                      synthetic_splits(), registry(), device="cpu")

    def renorm(model):
        with torch.no_grad():
            for w in weights(model):
                w.copy_(torch.renorm(w, 2, 0, c))  # rows of nn.Linear's weight: one unit's incoming weights

    ref = reference(trainer, 1, lambda m, logits, y: F.cross_entropy(logits, y), after_step=renorm)
    trainer.fit()
    assert_same_weights(trainer, ref)
    norms = torch.cat([torch.linalg.vector_norm(w, dim=1) for w in weights(ref)])
    assert float(norms.max()) <= c * (1 + 1e-6) and float(norms.max()) > c * 0.99  # the constraint was active


def test_ema_is_torchs_averaged_model_and_evaluation_uses_the_average():
    decay = 0.9
    trainer = Trainer([config(regularizers=[{"name": "ema", "decay": decay}], epochs=2, **SETUP)],
                      synthetic_splits(), registry(), device="cpu")
    averaged = []

    def update(model):
        if not averaged:
            averaged.append(AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay)))
        averaged[0].update_parameters(model)

    ref = reference(trainer, 2, lambda m, logits, y: F.cross_entropy(logits, y), after_step=update)
    (result,) = trainer.fit()
    assert_same_weights(trainer, ref)  # training itself is unchanged by the average
    state = trainer.plugins[0].state
    avg = {n: state[n][0] for n in trainer.params}
    assert_same_weights(trainer, averaged[0].module, params=avg, tol=1e-12)
    assert int(state["updates"][0]) == 40 == int(averaged[0].n_averaged)
    # Validation and test ran on the average, not on the trained weights.
    with torch.no_grad():
        val_logits = averaged[0](trainer.val_x)
        test_logits = averaged[0](trainer.test_x)
    assert result.epochs[-1]["val_loss"] == pytest.approx(float(F.cross_entropy(val_logits, trainer.val_y)), rel=1e-9)
    assert result.final["test_acc"] == pytest.approx(float((test_logits.argmax(1) == trainer.test_y).double().mean()))
    trained_val = float(F.cross_entropy(ref(trainer.val_x), trainer.val_y))
    assert abs(trained_val - result.epochs[-1]["val_loss"]) > 1e-4


def test_ema_resumes_exactly_from_a_checkpoint():
    cfg = config(regularizers=[{"name": "ema", "decay": 0.95}], epochs=3, **SETUP)
    straight = Trainer([cfg], synthetic_splits(), registry(), device="cpu")
    (expected,) = straight.fit()
    first = Trainer([cfg.model_copy(update={"epochs": 1})], synthetic_splits(), registry(), device="cpu")
    first.fit()
    saved = first.state_dict()
    assert set(saved["plugin_state"][0]) == {*first.params, "updates"}
    resumed = Trainer([cfg], synthetic_splits(), registry(), device="cpu")
    resumed.load_state_dict(saved)
    (got,) = resumed.fit()
    for name, t in straight.plugins[0].state.items():
        assert torch.equal(t, resumed.plugins[0].state[name]), name
    assert [m["val_loss"] for m in got.epochs] == [m["val_loss"] for m in expected.epochs]
    assert got.final["test_acc"] == expected.final["test_acc"]


def _mixup_hp(alphas):
    plugin = registry().get("mixup")
    return plugin, HyperParams([plugin.config_model(name="mixup", alpha=a) for a in alphas], dtype=torch.float64,
                               device="cpu")


def _ctx(K, B):
    return TrainContext(num_models=K, world_size=1, rank=0, global_batch=B, local_batch=B, steps_per_epoch=1,
                        train_size=B, num_classes=10, device=torch.device("cpu"), dtype=torch.float64)


def test_mixup_mixes_pairs_with_one_beta_lambda_per_batch_and_its_loss_is_the_mixed_cross_entropy():
    plugin, hp = _mixup_hp([0.4, 2.0])
    K, B = 2, 12
    # Example i is the basis vector e_i, so the mixed batch shows λ and the partner π(i) of every example.
    x = torch.eye(B, 784, dtype=torch.float64).expand(K, -1, -1)
    y = torch.randint(0, 10, (K, B), generator=torch.Generator().manual_seed(1))
    mixed_x, mixed_t = plugin.hooks["on_batch"](x=x, targets=y, hp=hp, rng=StackedRNG([1, 2], "cpu"), ctx=_ctx(K, B))
    assert mixed_t.shape == (K, B, 10) and torch.allclose(mixed_t.sum(-1), torch.ones(K, B, dtype=torch.float64))
    logits = torch.randn(K, B, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for k in range(K):
        rows = mixed_x[k, :, :B]
        partner = torch.where(rows.count_nonzero(1) == 2, (rows - rows.diag().diag()).argmax(1), torch.arange(B))
        assert sorted(partner.tolist()) == list(range(B))  # a permutation
        lam = rows.diag()[partner != torch.arange(B)]
        assert torch.allclose(lam, lam[0].expand_as(lam))  # one λ for the whole batch
        lam = float(lam[0])
        loss = F.cross_entropy(logits[k], mixed_t[k])  # the trainer's soft-target loss
        paper = lam * F.cross_entropy(logits[k], y[k]) + (1 - lam) * F.cross_entropy(logits[k], y[k, partner])
        assert float(loss) == pytest.approx(float(paper), rel=1e-12)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_mixups_lambda_follows_beta_alpha_alpha(alpha):
    """λ over 4000 batches against torch.distributions.Beta: mean, variance and a two-sample KS test."""
    plugin, hp = _mixup_hp([alpha])
    rng = StackedRNG([7], "cpu")
    x = torch.zeros(1, 2, 784, dtype=torch.float64)
    x[0, 0, 0] = 1
    y = torch.zeros(1, 2, dtype=torch.long)
    lams = []
    while len(lams) < 4000:
        mixed, _ = plugin.hooks["on_batch"](x=x, targets=y, hp=hp, rng=rng, ctx=_ctx(1, 2))
        # Example 0 is e_0; its mix with itself keeps 1, with example 1 (zeros) keeps λ: only the latter shows λ.
        if float(mixed[0, 1, 0]) != 0:
            lams.append(1 - float(mixed[0, 1, 0]))
    ours = torch.tensor(lams, dtype=torch.float64)
    torch.manual_seed(0)
    theirs = torch.distributions.Beta(alpha, alpha).sample((4000,)).double()
    n = len(ours)
    assert float(ours.mean()) == pytest.approx(0.5, abs=4 * math.sqrt(1 / (4 * (2 * alpha + 1)) / n))
    assert float(ours.var()) == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)
    grid = torch.sort(torch.cat([ours, theirs])).values
    ks = float((torch.searchsorted(torch.sort(ours).values, grid, right=True) / n
                - torch.searchsorted(torch.sort(theirs).values, grid, right=True) / n).abs().max())
    assert ks < 1.63 * math.sqrt(2 / n)  # the 1% critical value of the two-sample KS statistic


def test_mixup_trains_and_reports_accuracy_against_the_true_labels():
    trainer = Trainer([config(regularizers=[{"name": "mixup", "alpha": 0.4}], epochs=2, **SETUP)],
                      synthetic_splits(), registry(), device="cpu")
    (result,) = trainer.fit()
    assert result.outcome == "succeeded" and 0 <= result.epochs[-1]["train_acc"] <= 1
    # The loss is against soft targets: it cannot reach zero, and accuracy still counts the example's own label.
    assert result.epochs[-1]["train_loss"] > 0.05


@pytest.mark.parametrize("cls, settings", [
    (L1, [{"strength": 1e-3}, {"strength": 1e-2}, {"strength": 0.0}]),
    (LabelSmoothing, [{"epsilon": 0.1}, {"epsilon": 0.3}, {"epsilon": 0.0}]),
    (Mixup, [{"alpha": 0.2}, {"alpha": 1.0}, {"alpha": 0.4}]),
    (EMA, [{"decay": 0.9}, {"decay": 0.5}, {"decay": 0.99}]),
    (MaxNorm, [{"max_norm": 0.5}, {"max_norm": 1.0}, {"max_norm": 3.0}]),
])
def test_the_new_builtins_pass_check_plugin(cls, settings):
    report = check_plugin(cls, settings)
    assert report.passed[:4] == ["contract", "K-independence", "determinism", "exact resume"]
    assert "DDP normalisation" in report.passed  # none draws from a rank's own stream
