"""The daemon on a real local Ray: 2-rank gloo gangs, warm reuse, cancel and priority, the store behind
`submit --wait`/`status`/`results`/`logs`, and a restart of the daemon process."""

from __future__ import annotations

import functools
import json
import os
import re
import textwrap
import time
from pathlib import Path

import pytest
import ray
import yaml
from support import is_loopback, listening_sockets, local_daemon, process_tree, run_cli, spec_file, wait_for

from l2cluster.cli import main
from l2cluster.results.store import Store

pytestmark = pytest.mark.slow  # every test runs on a local Ray (one starts a daemon process)

TINY = {"model": {"hidden_sizes": [16]}, "data": {"batch_size": 50, "val_size": 100},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 1}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_mnist_dir):
    """A local Ray with 4 logical CPUs and a coordinator on a fresh store."""
    with local_daemon(tmp_path_factory.mktemp("daemon") / "store.db", num_cpus=4, data_dir=str(tiny_mnist_dir)) as c:
        yield c


write_spec = functools.partial(spec_file, base=TINY)  # write_spec(directory, name, **fields)


def submit(spec, *extra, capsys):
    code = main(["submit", spec, *extra])
    out = capsys.readouterr().out
    return code, out


def jobs_of(cluster, experiment):
    return ray.get(cluster["handle"].status.remote(experiment))


def test_submit_wait_runs_two_rank_jobs_and_stores_their_results(cluster, tmp_path, capsys):
    spec = write_spec(tmp_path, "two-ranks", scaling={"num_workers": 2},
                      sweep={"seeds": [0, 1], "grid": {"optimizer.lr": [0.01, 0.003]}})
    code, out = submit(spec, "--wait", capsys=capsys)
    assert code == 0
    experiment = out.splitlines()[0]
    rows = [line for line in out.splitlines() if re.match(r"^[0-9a-f]{16}\s", line)]
    assert len(rows) == 4 and all(" succeeded " in r for r in rows)
    store = Store(cluster["store"])
    jobs = store.jobs(experiment)
    assert [j["state"] for j in jobs] == ["succeeded"] * 4
    for j in jobs:
        assert len(store.epochs(j["id"])) == 1 and store.result(j["id"])["final"]["test_acc"] > 0.5
    assert main(["results", experiment, "--jobs"]) == 0
    assert capsys.readouterr().out.count("succeeded") == 4
    assert main(["logs", jobs[0]["id"]]) == 0
    log = capsys.readouterr().out
    # cmd_logs prints f"{at}  {from:>9} → {to:<9} attempt {n}  {detail}"; an attempt counts from entering running.
    at = r"\d\d:\d\d:\d\d"
    assert re.search(rf"^{at}     queued → placing   attempt 0(  \S.*)?$", log, re.M), log
    assert re.search(rf"^{at}    running → succeeded attempt 1(  \S.*)?$", log, re.M), log


def test_one_and_two_ranks_train_the_same_parameters(cluster, tmp_path, capsys):
    fields = dict(model={"hidden_sizes": [16], "dtype": "float64"}, epochs=2, seed=3)
    finals = []
    for workers in (1, 2):
        spec = write_spec(tmp_path, f"ranks-{workers}", scaling={"num_workers": workers}, **fields)
        code, out = submit(spec, "--wait", capsys=capsys)
        assert code == 0
        (job,) = ray.get(cluster["handle"].results.remote(out.splitlines()[0]))
        finals.append(job["result"]["final"])
    assert finals[0]["param_sum"] == pytest.approx(finals[1]["param_sum"], rel=1e-10)
    assert finals[0]["val_loss"] == pytest.approx(finals[1]["val_loss"], rel=1e-10)


def test_gangs_stay_warm_same_processes_one_process_group(cluster, tmp_path, capsys):
    """A gang that fills the cluster runs job after job: the same rank processes, one process group. (The jobs opt
    out of packing, which would train the three seeds as one run: tests/test_packing_daemon.py covers packs.)"""
    whole = {"scaling": {"num_workers": 2, "cpus_per_worker": 2, "pack": False}}

    def gang():
        (g,) = [g for g in ray.get(cluster["handle"].gangs_info.remote()) if g["shape"]["cpus_per_worker"] == 2]
        return g["ranks"]

    assert submit(write_spec(tmp_path, "warm-first", **whole), "--wait", capsys=capsys)[0] == 0
    first = gang()
    assert submit(write_spec(tmp_path, "warm-next", sweep={"seeds": [5, 6, 7]}, **whole), "--wait",
                  capsys=capsys)[0] == 0
    after = gang()
    assert [r["pid"] for r in after] == [r["pid"] for r in first]  # no new processes
    assert [r["jobs_run"] for r in after] == [r["jobs_run"] + 3 for r in first] == [4, 4]
    assert [r["process_groups_started"] for r in after] == [1, 1]  # no new process group


def test_cancel_frees_the_gang_and_priority_overtakes_the_queue(cluster, tmp_path, capsys):
    whole = {"scaling": {"num_workers": 1, "cpus_per_worker": 4}}  # one gang fills the cluster: jobs queue
    long = write_spec(tmp_path, "long", epochs=500, **whole)
    code, out = submit(long, capsys=capsys)
    long_exp = out.strip()
    wait_for(lambda: jobs_of(cluster, long_exp)[0]["state"] == "running" and jobs_of(cluster, long_exp)[0]["epoch"])
    low = submit(write_spec(tmp_path, "low", sweep={"seeds": [1, 2]}, **whole), capsys=capsys)[1].strip()
    high = submit(write_spec(tmp_path, "high", **whole), "--priority", "5", capsys=capsys)[1].strip()
    (long_job,) = jobs_of(cluster, long_exp)
    t_cancel = time.time()
    assert main(["cancel", long_job["job"]]) == 0
    capsys.readouterr()
    wait_for(lambda: jobs_of(cluster, long_exp)[0]["state"] == "cancelled", timeout_s=20)
    assert time.time() - t_cancel < 10
    wait_for(lambda: all(j["state"] == "succeeded" for j in jobs_of(cluster, low) + jobs_of(cluster, high)),
             timeout_s=120)
    started = sorted((j["started_at"], j["experiment"]) for j in jobs_of(cluster, low) + jobs_of(cluster, high))
    assert started[0][1] == high  # submitted last, ran first
    assert jobs_of(cluster, long_exp)[0]["epoch"] < 500


def test_a_bad_spec_is_refused_and_the_daemon_keeps_serving(cluster, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "optimizer": {"name": "adam"}, "regularizers": [{"name": "l9"}]}))
    assert main(["submit", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "regularizers[0]" in err and "Traceback" not in err
    assert ray.get(cluster["handle"].ping.remote())["store"]


def _cli(*args, env):
    env = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}  # as in a user's shell
    return run_cli(*args, env=env)


def test_status_survives_a_daemon_restart(tmp_path, tiny_mnist_dir):
    env = {**os.environ, "L2CLUSTER_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    spec = tmp_path / "restart.yaml"
    spec.write_text(textwrap.dedent("""
        name: restart
        model: {hidden_sizes: [8]}
        data: {batch_size: 50, val_size: 100}
        optimizer: {name: adam, lr: 0.01}
        epochs: 1
        sweep: {seeds: [0, 1]}
    """))
    start = ["daemon", "start", "--data-dir", str(tiny_mnist_dir), "--num-cpus", "2"]
    try:
        assert _cli(*start, env=env).returncode == 0
        run = _cli("submit", str(spec), "--wait", env=env)
        assert run.returncode == 0, run.stderr
        experiment = run.stdout.splitlines()[0]
        assert _cli("daemon", "stop", env=env).returncode == 0
        # A normal stop is quiet: no crash-like dump from Ray's signal handler in the daemon's log.
        log = (tmp_path / "home" / "daemon.log").read_text()
        assert "SIGTERM received" not in log and "Traceback" not in log, log
        assert _cli("daemon", "start", "--num-cpus", "2", env=env).returncode == 0
        status = _cli("status", env=env)
        assert re.search(rf"{experiment}\s+0\s+\S+ \S+\s+succeeded=2", status.stdout), status.stdout + status.stderr
        jobs = _cli("status", experiment, env=env)
        assert jobs.stdout.count("succeeded") == 2
    finally:
        _cli("daemon", "stop", env=env)


def test_a_job_the_cluster_can_never_hold_fails_with_the_reason(cluster, tmp_path, capsys):
    spec = write_spec(tmp_path, "too-big", scaling={"num_workers": 8})
    code, out = submit(spec, "--wait", capsys=capsys)
    assert code == 1
    (job,) = ray.get(cluster["handle"].results.remote(out.splitlines()[0]))
    assert job["state"] == "failed" and "the whole cluster has 4 CPU(s)" in job["result"]["error"]
    # Straight from the queue: never shown as placing, no attempt counted.
    events = Store(cluster["store"]).events(job["job"])
    assert [(e["old_state"], e["new_state"], e["attempt"]) for e in events] == [(None, "queued", 0),
                                                                                 ("queued", "failed", 0)]


def test_the_embedded_cluster_listens_on_127_0_0_1_only(cluster):
    addresses = [address for _, address in listening_sockets(process_tree(os.getpid()))]
    assert len(addresses) >= 1 and all(is_loopback(a) for a in addresses), addresses
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")


def test_gangs_shows_the_rank_processes_of_a_running_job(cluster, tmp_path, capsys):
    spec = write_spec(tmp_path, "pids", scaling={"num_workers": 2, "pack": False}, epochs=200,
                      data={"batch_size": 10, "val_size": 100})
    code, out = submit(spec, capsys=capsys)
    assert code == 0
    (job,) = jobs_of(cluster, out.splitlines()[0])
    try:
        wait_for(lambda: jobs_of(cluster, job["experiment"])[0]["state"] == "running", "the job to run")
        assert main(["gangs", job["job"][:8], "--format", "json"]) == 0
        (gang,) = json.loads(capsys.readouterr().out)
        assert gang["busy"] and gang["jobs"] == [job["job"]]
        pids = [r["pid"] for r in sorted(gang["ranks"], key=lambda r: r["rank"])]
        assert len(set(pids)) == 2
        for pid in pids:  # the rank processes themselves
            assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RankWorker")
        assert main(["gangs", job["job"][:8]]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == ["gang", "state", "jobs", "rank", "pid", "node", "packs_run"]
        assert [line.split()[3:5] for line in table[2:]] == [["0", str(pids[0])], ["1", str(pids[1])]]
        assert main(["gangs", "ffffffffffff"]) == 2
        assert "no gang runs a job 'ffffffffffff' now" in capsys.readouterr().err
    finally:
        assert main(["cancel", job["job"]]) == 0
