"""A real multi-process Ray cluster on this machine: a head and a second node started as separate `ray start`
processes (each with its own custom resource, ports and temp dir), the daemon started with `l2cluster daemon
start --address`, and an experiment submitted with `l2cluster submit --wait` from another process. Jobs run on
both nodes; then every process of the second node is killed mid-experiment and every job still finishes,
re-queued on the head and resumed from its checkpoint. Token authentication is on, with a token of the test's
own, and every server of the cluster listens on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from support import run_cli, wait_for

from l2cluster.results.store import Store

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
# Ray turns a node address of 127.0.0.1 into the machine's outward address, and its servers then listen on every
# interface. Its single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, as in l2cluster's embedded cluster)
# keeps 127.0.0.1, but in that mode `ray start --address` refuses to join a cluster: the second node runs the same
# `ray start` with the address taken as given instead.
LOOPBACK_JOIN = ("import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
                 "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())")
TERMINAL = {"succeeded", "failed", "diverged", "cancelled"}
# Eight one-rank jobs of a few seconds each: enough to keep both nodes busy past the point where the second one dies.
# One job per gang (scaling.pack: false): packed, the eight jobs finish before a node can be lost under them.
SPEC = {"name": "loopback", "model": {"hidden_sizes": [256, 256]}, "data": {"batch_size": 50, "val_size": 100},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 100, "sweep": {"seeds": list(range(8))},
        "scaling": {"pack": False}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        # After the command name: state, ppid, pgrp, session, ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def listening_addresses(pids: list[int]) -> set[str]:
    """The addresses that these processes' TCP sockets listen on."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])  # 32-bit words in host (little-endian) order
                ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
                found.add(str(getattr(ip, "ipv4_mapped", None) or ip))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class RayNode:
    """One `ray start --block` in a session of its own. Everything the node runs (GCS, raylet, agents, the
    workers the raylet forks) inherits that session, so the node is exactly the live processes of the session:
    that is how the test kills a node and how it makes sure nothing is left behind."""

    def __init__(self, name: str, ray_cli: list[str], args: list[str], env: dict, temp_dir: Path):
        self.name = name
        self.log_path = temp_dir / f"{name}.log"
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
        cmd = [*ray_cli, "start", "--block", *args, "--node-ip-address", "127.0.0.1", "--temp-dir",
               str(temp_dir / name), "--disable-usage-stats",
               "--object-store-memory", str(200 * 1024**2), "--min-worker-port", "0", "--max-worker-port", "0"]
        for flag in ports:  # never the defaults, which another cluster on this machine may hold
            cmd += [flag, str(free_port())]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_started(self, timeout_s: float = 90) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if "Ray runtime started" in self.log_path.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"ray node {self.name} did not start:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def pids(self) -> list[int]:
        return session_pids(self.proc.pid)

    def kill(self, timeout_s: float = 30) -> None:
        """SIGKILL every process of the node (as if the machine died) and wait until they are gone."""
        deadline = time.time() + timeout_s
        while (pids := self.pids()) and time.time() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        assert not self.pids(), f"node {self.name}: still alive after SIGKILL: {self.pids()}"

    def stop(self) -> None:
        """Ask `ray start --block` to stop its node (SIGTERM), then kill whatever it left behind."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        self.kill()


@pytest.fixture
def cluster(tiny_mnist_dir):
    """Head (1 CPU, resource head_node) and a second node (1 CPU, resource worker_node) on this machine."""
    # A short path of its own: Ray's socket paths live under it (Unix sockets allow ~107 bytes).
    root = Path(tempfile.mkdtemp(prefix="l2c-loopback-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),  # head, node, daemon and clients agree
        "L2CLUSTER_HOME": str(root / "home"),
        "OMP_NUM_THREADS": "1",
        # Test-only: notice a dead node within ~3 s instead of ~15 s, and stop a node at once on SIGTERM.
        "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    })
    loopback = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the head and every client
    port, client_port = free_port(), free_port()
    nodes: list[RayNode] = []
    try:
        head = RayNode("head", [RAY], ["--head", "--port", str(port), "--ray-client-server-port", str(client_port),
                                       "--dashboard-port", str(free_port()), "--include-dashboard", "false",
                                       "--num-cpus", "1", "--resources", json.dumps({"head_node": 1})], loopback, root)
        nodes.append(head)
        head.wait_started()
        worker = RayNode("worker", [sys.executable, "-c", LOOPBACK_JOIN],
                         ["--address", f"127.0.0.1:{port}", "--num-cpus", "1",
                          "--resources", json.dumps({"worker_node": 1})], env, root)
        nodes.append(worker)
        worker.wait_started()
        yield {"root": root, "env": loopback, "address": f"127.0.0.1:{port}", "client": f"ray://127.0.0.1:{client_port}",
               "head": head, "worker": worker, "data": str(tiny_mnist_dir)}
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(root, ignore_errors=True)
    for node in nodes:  # outside finally: a leftover process fails the test instead of hiding its first error
        assert not node.pids(), f"node {node.name} left processes behind: {node.pids()}"


def alive_nodes(cluster) -> dict[str, dict]:
    """Node id → resources of the cluster's alive nodes, asked from a separate driver process."""
    code = ("import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))")
    out = subprocess.run([sys.executable, "-c", code, cluster["address"]], env=cluster["env"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def job_table(store: Store, experiment: str) -> str:
    rows = [(j["id"], j["state"], j["node"], j["epoch"], j["attempts"], j["started_at"], j["finished_at"], j["error"])
            for j in store.jobs(experiment)]
    return "\n".join(map(str, rows))


def test_jobs_run_on_both_nodes_and_survive_losing_one(cluster):
    env, address = cluster["env"], cluster["address"]
    nodes = alive_nodes(cluster)
    head_id = next(i for i, r in nodes.items() if r.get("head_node"))
    worker_id = next(i for i, r in nodes.items() if r.get("worker_node"))
    assert len(nodes) == 2 and head_id != worker_id

    # Token authentication is on: a client with another token is refused.
    refused = run_cli("status", "--address", address, env={**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    assert refused.returncode != 0 and "Traceback" not in refused.stderr

    store_path = cluster["root"] / "store.db"
    # The checkpoint directory is "shared storage": both nodes are on this machine.
    started = run_cli("daemon", "start", "--address", address, "--data-dir", cluster["data"], "--store",
                      str(store_path), "--checkpoint-dir", str(cluster["root"] / "checkpoints"),
                      "--idle-release-s", "300", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    # The coordinator runs on the head (the node `daemon start` ran on), not on the node that will die.
    coordinators = [p for node in ("head", "worker") for p in cluster[node].pids()
                    if cmdline(p).startswith("ray::Coordinator")]
    assert len(coordinators) == 1 and coordinators[0] in cluster["head"].pids()

    spec = cluster["root"] / "loopback.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    with open(cluster["root"] / "submit.out", "w+") as out, open(cluster["root"] / "submit.err", "w+") as err:
        submit = subprocess.Popen([sys.executable, "-m", "l2cluster.cli", "submit", str(spec), "--wait",
                                   "--address", address], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            store = Store(store_path)
            experiment = wait_for(lambda: [e["id"] for e in store.experiments()], "the experiment", 120)[0]

            def on(node_id: str, job) -> bool:
                return (job["node"] or "").endswith("/" + node_id[:6])

            # Jobs ran on both nodes.
            wait_for(lambda: all(any(j["state"] == "succeeded" and on(n, j) for j in store.jobs(experiment))
                                 for n in (head_id, worker_id)), "a finished job on each node", 240,
                     show=lambda: job_table(store, experiment))
            # Nothing of the cluster, gangs included, listens beyond the loopback interface.
            for node in ("head", "worker"):
                addresses = listening_addresses(cluster[node].pids())
                assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses), (node, addresses)
            # Then the second node dies while it trains a job: every one of its processes gets SIGKILL.
            victims = wait_for(lambda: [j["id"] for j in store.jobs(experiment)
                                        if j["state"] == "running" and on(worker_id, j) and j["epoch"] >= 1],
                               "a job training on the second node", 120, every_s=0.05,
                               show=lambda: job_table(store, experiment))
            killed_at = time.time()
            cluster["worker"].kill()

            code = submit.wait(timeout=300)
        finally:
            if submit.poll() is None:
                submit.kill()
                submit.wait()
        out.seek(0)
        err.seek(0)
        report = out.read() + err.read()

    jobs = {j["id"]: j for j in store.jobs(experiment)}
    states = {j: row["state"] for j, row in jobs.items()}
    assert states == dict.fromkeys(jobs, "succeeded"), (states, [(j, r["error"]) for j, r in jobs.items()], report)
    assert code == 0, report
    for job_id in victims:
        job = jobs[job_id]
        assert on(head_id, job), dict(job)  # re-run on the head
        assert job["attempts"] == 2
        events = store.events(job_id)
        assert ("running", "queued") in [(e["old_state"], e["new_state"]) for e in events]
        details = [e["detail"] or "" for e in events]
        assert any(d.startswith("attempt 1 lost (") and "re-queued" in d for d in details), details
        resumed = [d for d in details if d.startswith("resumed from the checkpoint of epoch")]
        assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= 1, details
    # Whatever finished after the loss ran on the head; every job has its full set of epochs and a result.
    for job in jobs.values():
        if job["finished_at"] > killed_at:
            assert on(head_id, job), dict(job)
        assert len(store.epochs(job["id"])) == SPEC["epochs"]
        assert store.result(job["id"])["final"]["test_acc"] > 0.5

    # `daemon start` honours RAY_ADDRESS: it finds the running coordinator and starts no local daemon.
    again = run_cli("daemon", "start", "--store", str(store_path), env={**env, "RAY_ADDRESS": address})
    assert again.returncode == 0 and f"on the cluster at {address}" in again.stdout, again.stdout + again.stderr
    assert not (cluster["root"] / "home" / "daemon.json").exists()

    # The laptop path, Ray Client (`--address ray://`): the same spec again is the same experiment, all finished,
    # so `submit --wait` prints its results at once.
    again = run_cli("submit", str(spec), "--wait", "--address", cluster["client"], env=env)
    if again.returncode and "Initialization failure from server" in again.stderr:
        # Ray's client proxy could not keep its per-client server process alive, three connections in a row (seen
        # only inside the full suite on a 2-core machine; the process dies before it logs anything): Ray-side.
        pytest.skip(f"Ray Client's server failed to start: {again.stderr.strip().splitlines()[-1]}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines()[0] == experiment and "0 new" in again.stderr
    assert again.stdout.count(" succeeded ") == len(SPEC["sweep"]["seeds"])
