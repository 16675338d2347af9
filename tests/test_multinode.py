"""Multi-node: on a ray.cluster_utils.Cluster of three simulated nodes, jobs are placed on more than one node
and all finish."""

from __future__ import annotations

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from l2cluster.cli import main
from l2cluster.daemon import start_coordinator
from l2cluster.store import Store


@pytest.fixture
def three_nodes(tmp_path, tiny_mnist_dir):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="l2cluster", log_to_driver=False)
    store = tmp_path / "store.db"
    handle = start_coordinator(store, data_dir=str(tiny_mnist_dir), detached=False)
    try:
        yield {"store": store, "handle": handle}
    finally:
        ray.get(handle.shutdown.remote(), timeout=30)
        ray.shutdown()
        cluster.shutdown()


def test_jobs_spread_over_nodes_and_all_finish(three_nodes, tmp_path, capsys):
    spec = tmp_path / "spread.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "spread", "model": {"hidden_sizes": [16]}, "data": {"batch_size": 50, "val_size": 100},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 2, "sweep": {"seeds": [0, 1, 2, 3, 4, 5]}}))
    assert main(["submit", str(spec), "--wait"]) == 0
    experiment = capsys.readouterr().out.splitlines()[0]
    jobs = Store(three_nodes["store"]).jobs(experiment)
    assert [j["state"] for j in jobs] == ["succeeded"] * 6
    assert len({j["node"] for j in jobs}) > 1, [j["node"] for j in jobs]
