"""Every listening socket of a local daemon's process tree is on loopback, even where the hostname resolves to a
LAN address (as on most hosts: gloo's default device listens on that address).

The daemon runs in a private mount namespace whose /etc/hosts maps this machine's hostname to one of its
non-loopback addresses. A control run in the same namespace shows that a plain gloo process group does listen on
that address there, so the check can fail."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import is_loopback

from l2cluster.cluster.gang import interface_of, ipv4_addresses

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# Runs inside the namespace: prints one JSON object with what it saw.
_SCRIPT = r'''
import json, os, socket, subprocess, sys
from pathlib import Path

from support import listening_sockets, process_tree

lan_ip, mnist, home = sys.argv[1], sys.argv[2], Path(sys.argv[3])
out = {"resolved": socket.gethostbyname(socket.gethostname())}


def sockets_of(pids):
    return [{"pid": pid, "cmd": pids[pid][:60], "address": address} for pid, address in listening_sockets(pids)]


# Control: a plain gloo process group in this namespace, as torch sets it up by default.
proc = subprocess.Popen([sys.executable, "-c", """
import os, sys, time, torch.distributed as dist
from datetime import timedelta
store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
print("ready", flush=True)
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert proc.stdout.readline().strip() == "ready"
out["control"] = [address for _, address in listening_sockets([proc.pid])]
proc.stdin.close()
proc.wait(30)

env = {**os.environ, "L2CLUSTER_HOME": str(home), "RAY_AUTH_MODE": "disabled"}
cli = [sys.executable, "-m", "l2cluster.cli"]
subprocess.run(cli + ["daemon", "start", "--num-cpus", "2", "--data-dir", mnist], env=env, check=True,
               stdout=subprocess.DEVNULL, timeout=180)
daemon_pid = json.loads((home / "daemon.json").read_text())["pid"]
out["samples"] = {}
try:
    for workers in (1, 2):
        spec = home / f"spec{workers}.yaml"
        spec.write_text(json.dumps({
            "name": f"listen{workers}", "model": {"hidden_sizes": [16]}, "optimizer": {"name": "adam"},
            "data": {"batch_size": 50, "val_size": 100, "train_size": 400}, "epochs": 1,
            "scaling": {"num_workers": workers, "cpus_per_worker": 1}}))
        subprocess.run(cli + ["submit", str(spec), "--wait"], env=env, check=True, stdout=subprocess.DEVNULL,
                       timeout=300)
        # The gang stays warm after its job (idle_release_s): its ranks still hold their process group.
        out["samples"][workers] = sockets_of(process_tree(daemon_pid))
finally:
    subprocess.run(cli + ["daemon", "stop"], env=env, timeout=120)
print(json.dumps(out))
'''


def _lan_address() -> str | None:
    """A non-loopback IPv4 address of this host, or None."""
    return next((ip for ip in ipv4_addresses().values() if not ip.startswith("127.")), None)


def test_interface_of_finds_loopback_and_this_hosts_addresses():
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("::1") == "lo"
    assert interface_of("203.0.113.77") is None  # TEST-NET-3: not an address of this host
    lan = _lan_address()
    if lan is not None:
        assert interface_of(lan) not in (None, "lo")


def test_daemon_tree_listens_on_loopback_only_where_the_hostname_resolves_to_a_lan_address(tmp_path, mnist_dir):
    lan = _lan_address()
    if lan is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -m` (root) for a private /etc/hosts")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{lan} {socket.gethostname()}\n")
    script = tmp_path / "inside.py"
    script.write_text(_SCRIPT)
    home = tmp_path / "home"
    home.mkdir()
    inner = f"mount --bind {hosts} /etc/hosts && exec {sys.executable} {script} {lan} {mnist_dir} {home}"
    run = subprocess.run(["unshare", "-m", "sh", "-c", inner], capture_output=True, text=True, timeout=900,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["resolved"] == lan  # the namespace really makes the hostname a LAN name
    # The control: torch's default gloo device listens on the LAN address here.
    assert any(a.startswith(f"{lan}:") for a in seen["control"]), seen["control"]
    for workers, sockets in seen["samples"].items():
        print(f"{workers}-rank gang up; listening sockets of the daemon's tree:",
              *sorted({f"{s['address']} {s['cmd']}" for s in sockets}), sep="\n  ")
        ranks = [s for s in sockets if "RankWorker" in s["cmd"]]
        assert len({s["pid"] for s in ranks}) == int(workers), sockets  # sampled while the gang was up
        wide = [s for s in sockets if not is_loopback(s["address"])]
        assert not wide, f"{workers}-rank gang: listeners beyond loopback: {wide}"
