"""Ray's Jobs API: `ray job submit --working-dir DIR -- l2cluster run spec.yaml` on a real two-node `ray start`
cluster on 127.0.0.1 (the head with its dashboard, and a worker node) trains on that cluster: the job's `run` finds
the cluster through RAY_ADDRESS, starts a coordinator there for the run (no nested Ray), and stops it at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from test_cluster import LOOPBACK_JOIN, RAY, RayNode, free_port

from l2cluster.results.store import Store

pytestmark = pytest.mark.slow

SPEC = {"name": "ray-job", "model": {"hidden_sizes": [16]},
        "data": {"batch_size": 50, "val_size": 100, "train_size": 300},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 1, "sweep": {"seeds": [0, 1]}}


@pytest.fixture
def head():
    """A two-node cluster: `ray start --head` with the dashboard (the Jobs API's server) on 127.0.0.1, and a
    worker node that joins it."""
    pytest.importorskip("aiohttp", reason="the Jobs API needs ray[default]: pip install 'l2cluster[cluster]'")
    root = Path(tempfile.mkdtemp(prefix="l2c-jobs-", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1",
                "L2CLUSTER_HOME": str(root / "home"),
                # the job's entrypoint finds `l2cluster` (and `ray`) on the PATH the node was started with
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    port, dashboard = free_port(), free_port()
    node = RayNode("head", [RAY], ["--head", "--port", str(port), "--ray-client-server-port", str(free_port()),
                                   "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                                   "--dashboard-port", str(dashboard), "--num-cpus", "2"], env, root)
    nodes = [node]
    try:
        node.wait_started()
        # A worker joins on 127.0.0.1 as in tests/test_cluster.py (single-machine mode is for the head only).
        joining = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        nodes.append(RayNode("worker", [sys.executable, "-c", LOOPBACK_JOIN],
                             ["--address", f"127.0.0.1:{port}", "--num-cpus", "2"], joining, root))
        nodes[1].wait_started()
        yield {"root": root, "env": env, "gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}"}
    finally:
        for n in reversed(nodes):
            n.stop()
        shutil.rmtree(root, ignore_errors=True)
    for n in nodes:
        assert not n.pids(), f"the {n.name} node left processes behind: {n.pids()}"


def test_ray_job_submit_runs_l2cluster_run_on_the_cluster(head, mnist_dir):
    workdir = head["root"] / "workdir"
    workdir.mkdir()
    (workdir / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    store = head["root"] / "store.db"
    out = subprocess.run([RAY, "job", "submit", "--address", head["dashboard"], "--working-dir", str(workdir), "--",
                          "l2cluster", "run", "spec.yaml", "--data-dir", str(mnist_dir), "--store", str(store)],
                         env=head["env"], capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in log, log[-5000:]
    assert "starting a coordinator there for this run" in log and "starting a local Ray" not in log, log[-5000:]

    # The jobs ran on this cluster's nodes, by a coordinator on it, in the store given.
    (experiment,) = [e["id"] for e in Store(store).experiments()]
    jobs = Store(store).jobs(experiment)
    assert [j["state"] for j in jobs] == ["succeeded"] * 2
    node_ids = subprocess.run([sys.executable, "-c", "import sys, ray; ray.init(address=sys.argv[1], "
                               "logging_level='ERROR', log_to_driver=False); print(*[n['NodeID'] for n in ray.nodes() "
                               "if n['Alive']])", head["gcs"]], env=head["env"], capture_output=True, text=True,
                              timeout=120)
    assert node_ids.returncode == 0, node_ids.stderr[-3000:]
    short = {n[:6] for n in node_ids.stdout.split()}
    assert len(short) == 2 and all(j["node"].rsplit("/", 1)[1] in short for j in jobs), ([j["node"] for j in jobs],
                                                                                         short)
    from ray.util.state import list_actors

    coordinators = list_actors(address=head["dashboard"], filters=[("class_name", "=", "Coordinator")])
    # One coordinator on this cluster, started for the run and gone with it.
    assert [a.state for a in coordinators] == ["DEAD"], coordinators
