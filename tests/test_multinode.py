"""Multi-node: on a ray.cluster_utils.Cluster of three simulated nodes, jobs are placed on more than one node
and all finish."""

from __future__ import annotations

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from l2cluster.cli import main
from l2cluster.cluster.daemon import start_coordinator
from l2cluster.results.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture
def three_nodes(tmp_path, mnist_dir):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="l2cluster", log_to_driver=False)
    store = tmp_path / "store.db"
    handle = start_coordinator(store, data_dir=str(mnist_dir), detached=False)
    try:
        yield {"store": store, "handle": handle, "cluster": cluster}
    finally:
        ray.get(handle.shutdown.remote(), timeout=30)
        ray.shutdown()
        cluster.shutdown()


def test_jobs_spread_over_nodes_and_all_finish(three_nodes, tmp_path, capsys):
    spec = tmp_path / "spread.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "spread", "model": {"hidden_sizes": [16]},
        "data": {"batch_size": 50, "val_size": 100, "train_size": 500},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 2, "sweep": {"seeds": [0, 1, 2, 3, 4, 5]}}))
    assert main(["submit", str(spec), "--wait"]) == 0
    experiment = capsys.readouterr().out.splitlines()[0]
    jobs = Store(three_nodes["store"]).jobs(experiment)
    assert [j["state"] for j in jobs] == ["succeeded"] * 6
    assert len({j["node"] for j in jobs}) > 1, [j["node"] for j in jobs]


def test_a_lost_node_s_jobs_finish_elsewhere(three_nodes):
    """remove_node() kills a node with a running job: the job goes back to the queue, resumes on another node
    from its checkpoint (the nodes share this machine's disk, as a cluster shares storage) and every job ends."""
    import time

    handle, store = three_nodes["handle"], Store(three_nodes["store"])
    spec = {"name": "node-loss", "model": {"hidden_sizes": [32]},
            "data": {"batch_size": 20, "val_size": 500, "train_size": 2000},
            "optimizer": {"name": "adam", "lr": 0.003}, "epochs": 5, "sweep": {"seeds": [0, 1, 2, 3]}}
    exp = ray.get(handle.submit.remote(spec))["experiment"]
    head = three_nodes["cluster"].head_node.node_id
    deadline = time.time() + 120
    while time.time() < deadline:  # a job running on a worker node, past its first checkpoint
        victims = [j for j in store.jobs(exp) if j["state"] == "running" and j["epoch"] >= 1
                   and not j["node"].endswith(head[:6])]
        if victims:
            break
        time.sleep(0.05)
    victim = victims[0]
    node = next(n for n in three_nodes["cluster"].worker_nodes if victim["node"].endswith(n.node_id[:6]))
    three_nodes["cluster"].remove_node(node)

    deadline = time.time() + 240
    while time.time() < deadline and any(j["state"] not in ("succeeded", "failed") for j in store.jobs(exp)):
        time.sleep(0.2)
    jobs = {j["id"]: j for j in store.jobs(exp)}
    assert [j["state"] for j in jobs.values()] == ["succeeded"] * 4, [(j["state"], j["error"]) for j in jobs.values()]
    assert jobs[victim["id"]]["attempts"] == 2
    assert not jobs[victim["id"]]["node"].endswith(node.node_id[:6])
