"""Shared builders for tests: the default registry, training configs and small synthetic splits."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from l2cluster.plugin import Regularizer
from l2cluster.registry import Registry, load_builtins, load_registry
from l2cluster.spec import spec_models
from l2cluster.states import JobState
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

    from l2cluster.cluster.daemon import start_coordinator, start_local_ray

    start_local_ray(num_cpus=num_cpus)
    handle = start_coordinator(store, idle_release_s=300, detached=False, **options)
    try:
        yield {"store": store, "handle": handle}
    finally:
        ray.get(handle.shutdown.remote(), timeout=30)
        ray.shutdown()


def call(handle, method: str, *args, restart_wait_s: float = 120.0):
    """The coordinator's answer to `method(*args)`, asked again while Ray restarts a coordinator that died (every
    coordinator call is safe to repeat); a RayActorError once it has not come back within `restart_wait_s`."""
    import ray
    from ray.exceptions import RayActorError

    deadline = time.time() + restart_wait_s
    while True:
        try:
            return ray.get(getattr(handle, method).remote(*args), timeout=60)
        except RayActorError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def finished(cluster, experiment: str) -> list[dict] | None:
    """The jobs of `experiment` on a local_daemon `cluster` once every one has ended, else None (for wait_for)."""
    jobs = call(cluster["handle"], "status", experiment)
    return jobs if all(JobState(j["state"]).is_terminal for j in jobs) else None


def spec_file(directory: Path, name: str, base: dict, **fields) -> str:
    """A spec file `directory/name.yaml`: `base` with `name` and `fields` (top-level keys) set; returns its path."""
    import yaml

    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **base, **fields}))
    return str(path)


def run_cli(*args, env: dict | None = None, cwd: str | Path | None = None,
            timeout: float = 240.0) -> subprocess.CompletedProcess:
    """`python -m l2cluster.cli ARGS` in a new process with no stdin, as a user runs it: exit code, stdout, stderr
    (text). `env` replaces this process's environment when given."""
    return subprocess.run([sys.executable, "-m", "l2cluster.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)


def load_script(path: Path, name: str):
    """A script outside the package (bench/…) imported as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_for(predicate, what: str = "a condition", timeout_s: float = 60.0, every_s: float = 0.1, show=lambda: ""):
    """Poll `predicate` until it returns something truthy (returned); AssertionError naming `what` on timeout."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{show()}")


# -- sockets and processes, from /proc (no ss or psutil needed) -------------------------------------------------
def process_tree(root: int) -> dict[int, str]:
    """{pid: command line} of `root`, its session (a daemon runs in a session of its own) and its descendants."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        procs[int(entry.name)] = (int(fields[1]), int(fields[3]), cmd)  # ppid, session id, command line
    members = {p for p, (_, sid, _) in procs.items() if sid == root} | {root}
    while more := {p for p, (ppid, _, _) in procs.items() if ppid in members} - members:
        members |= more
    return {p: procs[p][2] for p in members if p in procs}


def listening_sockets(pids) -> list[tuple[int, str]]:
    """(pid, "address:port") of every TCP socket these processes listen on."""
    table = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(path).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A":  # LISTEN
                continue
            hex_ip, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_ip)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints host-order words
            table[cols[9]] = f"{ipaddress.ip_address(raw)}:{int(hex_port, 16)}"
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in table:
                        found.append((pid, table[link[8:-1]]))
    return found


def is_loopback(address: str) -> bool:
    """Whether an "address:port" is on loopback (127.0.0.0/8, ::1, or 127.x mapped into IPv6)."""
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)
