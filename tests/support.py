"""Shared builders for tests: the default registry, training configs and small synthetic splits."""

from __future__ import annotations

import contextlib
import functools
import time

import torch
from pydantic import BaseModel, ConfigDict

from l2cluster.plugin import Regularizer
from l2cluster.registry import Registry, load_builtins, load_registry
from l2cluster.spec import spec_models
from l2cluster.testing import synthetic_splits  # noqa: F401 (the tests import it from here)


@functools.cache
def registry():
    return load_registry(use_entry_points=False)


class InfGradients(Regularizer):
    """Makes a model's gradients inf: never (when=0), on about half of the steps (when=1: picked by a digit of its
    gradients, so it varies from step to step yet is the same on every device), or always (when=2). No host reads
    and no `step` argument, so it runs inside a CUDA graph; put grad_clip after it to skip those models' steps."""

    name = "inf_gradients"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        when: float = 0

    @torch.no_grad()
    def on_gradients(self, params, hp):
        digit = (params["layers.0.bias"].grad.flatten(1).sum(1) * 1000).remainder(1)
        bad = (hp.when == 2) | ((hp.when == 1) & (digit < 0.5))
        for p in params.values():
            p.grad.masked_fill_(bad.view(-1, *[1] * (p.dim() - 1)), float("inf"))


class AtStep(BaseModel):
    """Config of the test plugins that go wrong at one global step (per model when stacked)."""

    model_config = ConfigDict(extra="forbid")
    at_step: int = 10**9


class NanPenalty(Regularizer):
    """A penalty that is NaN at step `at_step`: the plugin, not the model, made the numbers non-finite."""

    name = "nan_penalty"
    Config = AtStep

    def penalty(self, params, hp, step):
        w = params["layers.0.weight"]
        out = 1e-4 * w.flatten(1).pow(2).sum(1)
        return torch.where(hp.at_step == step, torch.full_like(out, float("nan")), out)


class InfPenalty(Regularizer):
    """A penalty that overflows to inf at step `at_step`: a divergence."""

    name = "inf_penalty"
    Config = AtStep

    def penalty(self, params, hp, step):
        out = params["layers.0.weight"].flatten(1).sum(1) * 0
        return torch.where(hp.at_step == step, torch.full_like(out, float("inf")), out)


def registry_with(*plugins) -> Registry:
    """The built-ins plus test plugins."""
    reg = Registry()
    load_builtins(reg)
    for plugin in plugins:
        reg.register(plugin, "test")
    return reg


def config(reg=None, **fields):
    """A TrainConfig from keyword sections, e.g. config(optimizer={"name": "sgd", "lr": 0.1}, epochs=1)."""
    reg = reg or registry()
    fields.setdefault("optimizer", {"name": "adam", "lr": 1e-3})
    return spec_models(reg).train.model_validate(fields)


def params_of(trainer, k=None):
    """The trained parameters (model k's slice if k is given), detached copies by name."""
    return {n: (p.detach()[k] if k is not None else p.detach()).clone() for n, p in trainer.params.items()}


@contextlib.contextmanager
def local_daemon(store, *, num_cpus: int, **options):
    """A new local Ray (127.0.0.1) with a coordinator on `store`, shut down on exit: {"store", "handle"}."""
    import ray

    from l2cluster.daemon import start_coordinator, start_local_ray

    start_local_ray(num_cpus=num_cpus)
    handle = start_coordinator(store, idle_release_s=300, detached=False, **options)
    try:
        yield {"store": store, "handle": handle}
    finally:
        ray.get(handle.shutdown.remote(), timeout=30)
        ray.shutdown()


def wait_for(predicate, what: str = "a condition", timeout_s: float = 60.0, every_s: float = 0.1, show=lambda: ""):
    """Poll `predicate` until it returns something truthy (returned); AssertionError naming `what` on timeout."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{show()}")
