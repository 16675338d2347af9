"""Reaching the daemon: connect to a Ray cluster (or start a local one on 127.0.0.1), start, find and stop the
coordinator. `python -m l2cluster.cluster.daemon` is the long-lived host process of a local daemon: it owns the local
Ray head and the coordinator, and stops both (and nothing else) when it gets SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray

from l2cluster.errors import InputError
from l2cluster.limits import DEFAULT_MAX_JOBS
from l2cluster.results.store import checkpoint, default_store, home  # noqa: F401 (default_store: the daemon's store)

# The coordinator actor's name and namespace on the cluster: how every client finds the daemon.
NAMESPACE = "l2cluster"
NAME = "coordinator"


class DaemonError(InputError, RuntimeError):
    """The daemon cannot be reached or started; the message says what to do."""


def _state_file() -> Path:
    return home() / "daemon.json"


def read_state() -> dict | None:
    try:
        return json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return None


def ensure_auth_token() -> None:
    """Make sure Ray's token file exists before any process starts or joins a cluster.

    Ray (2.59+) turns token authentication on for new local clusters, but when ~/.ray/auth_token is missing a
    head and a client that start close together can each invent their own token, and the client is refused
    ("InvalidAuthToken"). Writing the one token first, readable by its owner only, avoids that race."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))


def _stay_on_loopback() -> None:
    """Keep this process's Ray node, and the processes it starts, on 127.0.0.1.

    ray.init() turns a node address of 127.0.0.1 into the machine's outward address: a head's servers (GCS,
    raylet, workers) then listen on every interface, and a client of a head on 127.0.0.1 dials the outward
    address, where nothing listens. Ray's single-machine mode (its default on macOS and Windows) keeps the node
    on the loopback address. Processes Ray starts read the environment variable; this process's Ray has read it
    at import already, hence the constant too."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def start_local_ray(num_cpus: int | None = None) -> None:
    """A Ray head bound to 127.0.0.1, in this process (ray.shutdown() stops exactly what it started)."""
    ensure_auth_token()
    _stay_on_loopback()
    # address="local": always a new cluster of our own; without it ray.init() joins any Ray already running here.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             # type-check: Ray's annotations are narrower than what it accepts
             namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR", configure_logging=False)  # type: ignore[arg-type]


def connect(address: str | None = None) -> None:
    """Connect this process to the daemon's cluster: --address, else RAY_ADDRESS, else the local daemon.

    A dead daemon is a DaemonError within seconds, never a hang in ray.init(): a local daemon whose host process is
    gone (its stale state file and leftover processes are cleaned up), or a cluster whose port refuses or does not
    answer a TCP connection."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and (state := read_state()):
        if not _alive(state["pid"]):
            clean_up_dead_daemon(state)
            raise DaemonError(f"the local daemon (pid {state['pid']}) is not running: it stopped without `l2cluster "
                              f"daemon stop` (see {home() / 'daemon.log'}); start it again with `l2cluster daemon "
                              "start`")
        address = state["address"]
    if not address:
        raise DaemonError("no daemon to talk to: start one with `l2cluster daemon start`, or pass --address "
                          "(or set RAY_ADDRESS) for a daemon on an existing Ray cluster")
    probe(address)
    ensure_auth_token()
    host = address.removeprefix("ray://").rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost") or host.startswith("127."):  # a local daemon's head
        _stay_on_loopback()
    if "RAY_AUTH_MODE" not in os.environ and not os.environ.get("RAY_AUTH_TOKEN"):
        # A client joining a cluster sends its token only in token mode; Ray does not infer it from the file.
        # Ray reads its config once per process, so refresh it as Ray's own token set-up does.
        os.environ["RAY_AUTH_MODE"] = "token"
        # type-check: a compiled module without type information
        from ray._raylet import Config  # type: ignore[attr-defined]

        Config.initialize("")
    for attempt in range(3):
        try:
            # type-check: Ray's annotations are narrower than what it accepts
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR",  # type: ignore[arg-type]
                     configure_logging=False)
            return
        except (ConnectionError, RuntimeError) as e:
            # Ray Client's proxy starts a server process per client; when that process dies at once ("Starting Ray
            # client server failed", or a ZombieProcess, seen on this 2-core machine) a new connection gets a new
            # server: try again.
            if address.startswith("ray://") and "Initialization failure from server" in str(e) and attempt < 2:
                time.sleep(2.0)
                continue
            raise DaemonError(f"cannot reach the Ray cluster at {address}: {e}") from None


def probe(address: str, timeout_s: float = 5.0) -> None:
    """A TCP connection to the cluster's GCS (or Ray Client) port within `timeout_s`, else a DaemonError: ray.init()
    on an address where nothing answers retries for minutes. "auto" (a Ray job's own cluster) is left to Ray."""
    hostport = address.removeprefix("ray://")
    if address == "auto" or "://" in hostport or ":" not in hostport:
        return
    host, port = hostport.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except ValueError:
        return  # not host:port; ray.init() says what is wrong with it
    except TimeoutError:
        raise DaemonError(f"cannot reach the Ray cluster at {address}: no answer within {timeout_s:.0f} s; check "
                          "the address and that the cluster is up") from None
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise DaemonError(f"cannot reach the Ray cluster at {address}: {reason}; check the address and that the "
                          "cluster is up (a local daemon: `l2cluster daemon start`)") from None


def coordinator():
    try:
        return ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        raise DaemonError("no l2cluster coordinator runs on this cluster: start it with `l2cluster daemon "
                          "start` (add --address to start it on an existing cluster)") from None


def start_coordinator(store: str | Path, *, plugin_dirs=(), data_dir: str | None = None,
                      idle_release_s: float = 60.0, strategy: str = "STRICT_PACK", detached: bool = True,
                      checkpoint_dir: str | None = None, max_jobs: int = DEFAULT_MAX_JOBS,
                      max_pack: int | None = None):
    """Create the named coordinator (or return the running one) and wait until it answers."""
    # On the head node: the store path is the head's, and the coordinator outlives any worker node.
    head = {"node:__internal_head__": 0.001} if "node:__internal_head__" in ray.cluster_resources() else {}
    from l2cluster.cluster.coordinator import Coordinator  # imports torch: only where a coordinator is started

    # type-check: Ray's actor decorators are not typed
    handle = Coordinator.options(  # type: ignore[attr-defined]
        name=NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached" if detached else None,
        resources=head,
    ).remote(str(Path(store).expanduser().resolve()), plugin_dirs=list(plugin_dirs), data_dir=data_dir,
             idle_release_s=idle_release_s, strategy=strategy, max_jobs=max_jobs, max_pack=max_pack,
             checkpoint_dir=str(Path(checkpoint_dir).expanduser().resolve()) if checkpoint_dir else None)
    ray.get(handle.ping.remote())
    return handle


def spawn_local_daemon(store: Path, *, plugin_dirs=(), data_dir: str | None, idle_release_s: float,
                       num_cpus: int | None, strategy: str = "STRICT_PACK", checkpoint_dir: str | None = None,
                       max_jobs: int = DEFAULT_MAX_JOBS, max_pack: int | None = None,
                       timeout_s: float = 90.0) -> dict:
    """Start `python -m l2cluster.cluster.daemon` in its own session and wait for it to publish its address."""
    if state := read_state():
        if _alive(state["pid"]):
            return state
        clean_up_dead_daemon(state)
    home().mkdir(parents=True, exist_ok=True)
    _state_file().unlink(missing_ok=True)
    ensure_auth_token()
    cmd = [sys.executable, "-m", "l2cluster.cluster.daemon", "--store", str(store),
           "--idle-release-s", str(idle_release_s), "--placement-strategy", strategy, "--max-jobs", str(max_jobs)]
    cmd += ["--data-dir", data_dir] if data_dir else []
    cmd += ["--num-cpus", str(num_cpus)] if num_cpus else []
    cmd += ["--max-pack", str(max_pack)] if max_pack else []
    cmd += ["--checkpoint-dir", str(Path(checkpoint_dir).resolve())] if checkpoint_dir else []
    for d in plugin_dirs:
        cmd += ["--plugin-dir", str(d)]
    with open(home() / "daemon.log", "ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = read_state()
        if state and state.get("pid") == proc.pid:
            return state
        if proc.poll() is not None:
            raise DaemonError(f"the daemon exited with code {proc.returncode}; see {home() / 'daemon.log'}")
        time.sleep(0.2)
    proc.terminate()
    raise DaemonError(f"the daemon did not start within {timeout_s:.0f} s; see {home() / 'daemon.log'}")


def stop_local_daemon(timeout_s: float = 60.0) -> bool:
    """SIGTERM the local daemon's host process (by its PID) and wait for it; False when none runs (what a dead one
    left behind is cleaned up)."""
    state = read_state()
    if not state or not _alive(state["pid"]):
        if state:
            clean_up_dead_daemon(state)
        _state_file().unlink(missing_ok=True)
        return False
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.time() + timeout_s
    while _alive(state["pid"]) and time.time() < deadline:
        time.sleep(0.2)
    if _alive(state["pid"]):
        raise DaemonError(f"the daemon (pid {state['pid']}) did not stop within {timeout_s:.0f} s")
    return True


def session_processes(sid: int) -> list[int]:
    """The live (non-zombie) processes of session `sid`, this one excepted."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # after the name: state, ppid, pgrp, session
            pids.append(int(entry.name))
    return pids


def clean_up_dead_daemon(state: dict, timeout_s: float = 10.0) -> list[int]:
    """After the host process of a local daemon died without `daemon stop` (SIGKILL, OOM): SIGKILL what is left of
    its Ray (agents and workers outlive the GCS and raylet for a while) and remove its state file. The host ran
    in a session of its own (spawn_local_daemon), so what it started is exactly the rest of that session; a
    session id is not reused while any process of it lives. Returns the PIDs killed."""
    sid = state.get("session", state["pid"])
    killed: list[int] = []
    deadline = time.time() + timeout_s
    while not _alive(state["pid"]) and (pids := session_processes(sid)) and time.time() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.1)
    if (read_state() or {}).get("pid") == state["pid"]:
        _state_file().unlink(missing_ok=True)
    return sorted(set(killed))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); ask the OS whether it has really run to completion.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def host_main(argv=None) -> int:
    """The local daemon's host process: Ray head + coordinator until SIGTERM."""
    p = argparse.ArgumentParser(prog="python -m l2cluster.cluster.daemon")
    p.add_argument("--store", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--plugin-dir", action="append", default=[])
    p.add_argument("--idle-release-s", type=float, default=60.0)
    p.add_argument("--num-cpus", type=int)
    p.add_argument("--placement-strategy", default="STRICT_PACK")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--max-jobs", type=int, default=DEFAULT_MAX_JOBS)
    p.add_argument("--max-pack", type=int)
    args = p.parse_args(argv)
    stop = threading.Event()
    on_signal = lambda *_: stop.set()  # noqa: E731
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    start_local_ray(args.num_cpus)
    # Ray's core has installed a crash handler that writes a stack dump on SIGTERM, which is how `daemon stop`
    # asks this process to stop: ours again, so that a normal stop is quiet.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        handle = start_coordinator(args.store, plugin_dirs=args.plugin_dir, data_dir=args.data_dir,
                                   idle_release_s=args.idle_release_s, strategy=args.placement_strategy,
                                   checkpoint_dir=args.checkpoint_dir, max_jobs=args.max_jobs,
                                   max_pack=args.max_pack, detached=False)
        state = {"pid": os.getpid(), "session": os.getsid(0), "address": ray.get_runtime_context().gcs_address,
                 "store": args.store}
        tmp = _state_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(_state_file())
        while not stop.wait(0.5):
            pass
        with contextlib.suppress(Exception):  # stopping anyway
            ray.get(handle.shutdown.remote(), timeout=20)
    finally:
        left = read_state()
        if left and left.get("pid") == os.getpid():
            _state_file().unlink(missing_ok=True)
        ray.shutdown()
        with contextlib.suppress(Exception):  # the coordinator closed the store; this is for one that could not
            checkpoint(args.store)
    return 0


if __name__ == "__main__":
    sys.exit(host_main())
