"""Fault tolerance on a real local Ray: a SIGKILLed rank sends its job back to the queue and it resumes from its
last checkpoint, ending exactly as an uninterrupted twin; a killed coordinator is restarted by Ray and loses
nothing; max_attempts bounds the retries; a diverged job is final."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pytest
import ray
from ray.exceptions import RayActorError
from support import call, finished, local_daemon, wait_for

from l2cluster.results.store import Store
from l2cluster.states import JobState

pytestmark = pytest.mark.slow

# Real MNIST (or the fixture), 2,000 training images, batch 20: a few tenths of a second per epoch, long enough
# to be interrupted mid-run. Dropout makes the per-rank random streams part of what must be restored.
JOB = {"model": {"hidden_sizes": [32]}, "data": {"batch_size": 20, "val_size": 500, "train_size": 2000},
       "optimizer": {"name": "adam", "lr": 0.003}, "regularizers": [{"name": "dropout", "p": 0.1}], "epochs": 6}
TIMINGS = {"train_s", "epoch_s"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, mnist_dir):
    with local_daemon(tmp_path_factory.mktemp("ft") / "store.db", num_cpus=4, data_dir=str(mnist_dir)) as c:
        yield c


def submit(cluster, name, **fields):
    return call(cluster["handle"], "submit", {"name": name, **JOB, **fields})["experiment"]


def wait_until(predicate):
    return wait_for(predicate, timeout_s=240.0)


def outcome(store, job_id):
    """A job's final metrics and per-epoch metrics without the timings."""
    result = store.result(job_id)
    final = {k: v for k, v in result["final"].items() if k not in TIMINGS}
    epochs = [{k: v for k, v in e.items() if k not in TIMINGS} for e in store.epochs(job_id)]
    return result["outcome"], final, epochs


def kill_a_rank_of(cluster, job_id, rank):
    """SIGKILL the process of one rank of the gang running `job_id`; returns its pid."""
    gangs = call(cluster["handle"], "gangs_info")
    gang = next(g for g in gangs if g["job"] == job_id)
    pid = next(r["pid"] for r in gang["ranks"] if r["rank"] == rank)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_killed_rank_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(cluster):
    store = Store(cluster["store"])
    two_ranks = {"scaling": {"num_workers": 2}}
    twin = wait_until(lambda: finished(cluster, submit(cluster, "ft-twin", **two_ranks)))[0]
    exp = submit(cluster, "ft-kill", **two_ranks)
    (job,) = call(cluster["handle"], "status", exp)
    wait_until(lambda: store.job(job["job"])["epoch"] >= 2)
    killed = kill_a_rank_of(cluster, job["job"], rank=1)

    (done,) = wait_until(lambda: finished(cluster, exp))
    assert done["state"] == "succeeded" and done["attempts"] == 2
    details = [e["detail"] or "" for e in store.events(job["job"])]
    lost = next(d for d in details if d.startswith("attempt 1 lost (a rank of its gang died"))
    assert f"pid: {killed}" in lost and len(lost) > 500, lost  # Ray's whole multi-line error, not cut
    resumed = [d for d in details if d.startswith("resumed from the checkpoint of epoch")]
    assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= 2, details
    assert outcome(store, job["job"]) == outcome(store, twin["job"])  # bit-identical metrics and parameter sum
    # The dead gang was torn down and the retry ran on new processes; the checkpoints are gone.
    ranks = [r["pid"] for g in call(cluster["handle"], "gangs_info") for r in g["ranks"]]
    assert killed not in ranks
    assert not (cluster["store"].parent / "checkpoints" / job["job"]).exists()


def test_max_attempts_bounds_the_retries(cluster):
    store = Store(cluster["store"])
    exp = submit(cluster, "ft-once", max_attempts=1)
    (job,) = call(cluster["handle"], "status", exp)
    wait_until(lambda: store.job(job["job"])["epoch"] >= 1)
    kill_a_rank_of(cluster, job["job"], rank=0)
    (done,) = wait_until(lambda: finished(cluster, exp))
    assert done["state"] == "failed" and done["attempts"] == 1
    assert "gave up after 1 attempt(s) (max_attempts); the last: a rank of its gang died" in done["error"]


def test_a_diverged_job_is_final_and_not_retried(cluster):
    exp = submit(cluster, "ft-diverge", optimizer={"name": "sgd", "lr": 10.0}, epochs=3,
                 regularizers=[{"name": "l2", "strength": 10.0}])
    (done,) = wait_until(lambda: finished(cluster, exp))
    assert done["state"] == "diverged" and done["attempts"] == 1
    assert Store(cluster["store"]).result(done["job"])["diverged_epoch"] == 1


def test_a_killed_coordinator_is_restarted_and_loses_nothing(cluster):
    store = Store(cluster["store"])
    seeds = {"sweep": {"seeds": [0, 1, 2]}}
    twins = wait_until(lambda: finished(cluster, submit(cluster, "ft-coord-twin", **seeds)))
    exp = submit(cluster, "ft-coord", **seeds)
    wait_until(lambda: any(store.job(j["job"])["epoch"] >= 2 for j in call(cluster["handle"], "status", exp)))
    old_pid = call(cluster["handle"], "ping")["pid"]
    ray.kill(cluster["handle"], no_restart=False)

    jobs = wait_until(lambda: finished(cluster, exp))
    assert call(cluster["handle"], "ping")["pid"] != old_pid
    assert [j["state"] for j in jobs] == ["succeeded"] * 3
    restarted = [j for j in jobs if any("coordinator restarted" in (e["detail"] or "")
                                        for e in store.events(j["job"]))]
    assert restarted, "no job was in flight when the coordinator died"
    for j in jobs:
        terminal = [e for e in store.events(j["job"]) if JobState(e["new_state"]).is_terminal]
        assert len(terminal) == 1, f"{j['job']} finished {len(terminal)} times"
    # The dead gangs' placement groups were released: only the live gangs hold resources.
    held = [pg for pg in ray.util.placement_group_table().values()
            if pg["name"].startswith("l2cluster-gang-") and pg["state"] != "REMOVED"]
    assert len(held) == len(call(cluster["handle"], "gangs_info"))
    by_seed = {t["seed"]: t["job"] for t in twins}
    for j in jobs:
        assert outcome(store, j["job"]) == outcome(store, by_seed[j["seed"]]), j


def test_an_attempt_that_resumes_reports_the_epochs_of_its_checkpoint(cluster, mnist_dir):
    """A rank saves epoch E's checkpoint before it reports epoch E, and a node can die in between (the loopback
    cluster test hit it): the attempt that resumes from such a checkpoint must still leave every epoch in the
    store. Here the checkpoint of epoch 2 exists before the job's first attempt, which has reported nothing."""
    from l2cluster.registry import load_registry
    from l2cluster.spec import expand, parse_spec
    from l2cluster.training.checkpoint import JobCheckpoints
    from l2cluster.training.data import load_mnist, split_mnist
    from l2cluster.training.trainer import Trainer

    registry = load_registry([])
    spec = {"name": "ft-ahead", **JOB}
    (job,) = expand(parse_spec(spec, registry), registry)
    d = job.config.data
    splits = split_mnist(load_mnist(mnist_dir), val_size=d.val_size, seed=d.split_seed, train_size=d.train_size)
    trainer, saved = Trainer([job.config], splits, registry), {}

    def on_epoch(epoch, metrics):
        if epoch == 2:
            saved["state"] = trainer.state_dict()

    trainer.fit(on_epoch=on_epoch, should_stop=lambda: "state" in saved)
    JobCheckpoints(cluster["store"].parent / "checkpoints", job.id, rank=0).save(2, saved["state"])

    exp = submit(cluster, "ft-ahead")
    (done,) = wait_until(lambda: finished(cluster, exp))
    store = Store(cluster["store"])
    assert done["job"] == job.id and done["state"] == "succeeded" and done["attempts"] == 1
    assert "resumed from the checkpoint of epoch 2" in [e["detail"] for e in store.events(job.id)]
    assert [e["epoch"] for e in store.epochs(job.id)] == list(range(1, JOB["epochs"] + 1))


def test_the_cli_waits_out_a_coordinator_restart(cluster, capsys, monkeypatch):
    """A CLI call in flight when the coordinator dies (`submit --wait` polls for minutes) is asked again of the
    restarted coordinator instead of ending the command: every coordinator call is safe to repeat."""
    from concurrent.futures import ThreadPoolExecutor

    from l2cluster.cli import main

    # Each wait of the CLI's thread on a coordinator call: when it began and what ended it. The first must begin
    # before the kill (sent to a stopped process) and end in the coordinator's death; an answer to a call asked
    # again after the kill ends the command.
    real_get, asked = ray.get, []

    def recording_get(*args, **kwargs):
        if not threading.current_thread().name.startswith("cli"):
            return real_get(*args, **kwargs)
        wait = {"at": time.monotonic(), "error": None}
        asked.append(wait)
        try:
            return real_get(*args, **kwargs)
        except BaseException as e:
            wait["error"] = e
            raise

    pid = call(cluster["handle"], "ping")["pid"]
    os.kill(pid, signal.SIGSTOP)  # the call below reaches a process that cannot answer, then dies
    try:
        monkeypatch.setattr(ray, "get", recording_get)
        with ThreadPoolExecutor(1, thread_name_prefix="cli") as pool:
            status = pool.submit(main, ["status"])
            wait_for(lambda: asked, "the CLI to wait on the stopped coordinator", timeout_s=30)
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            assert status.result(timeout=120) == 0
    finally:
        monkeypatch.undo()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert "experiment" in capsys.readouterr().out
    assert asked[0]["at"] < killed_at and isinstance(asked[0]["error"], RayActorError), asked
    assert asked[-1]["at"] > killed_at and asked[-1]["error"] is None, asked
    assert call(cluster["handle"], "ping")["pid"] != pid


def test_a_gang_that_died_while_idle_is_replaced_without_charging_the_next_job(cluster):
    """A rank killed while its gang idles (its job has ended) must not count against the next job: with
    max_attempts 1 that job still trains, on a new gang, and succeeds with one attempt."""
    store = Store(cluster["store"])
    (first,) = wait_until(lambda: finished(cluster, submit(cluster, "ft-idle-1", epochs=1)))
    idle = [g for g in call(cluster["handle"], "gangs_info") if not g["busy"] and g["ranks"]]
    assert any(g["shape"]["num_workers"] == 1 for g in idle)  # the gang `first` ran on, among others
    victims = [g["ranks"][0]["pid"] for g in idle]  # a rank of every idle gang: the next job must meet a dead one
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in victims), "the ranks to die", timeout_s=30)
    exp = submit(cluster, "ft-idle-2", epochs=1, max_attempts=1)
    (done,) = wait_until(lambda: finished(cluster, exp))
    assert (done["state"], done["attempts"]) == ("succeeded", 1), done
    details = [e["detail"] or "" for e in store.events(done["job"])]
    assert any(d.startswith("its idle gang ") and "had died" in d and "no attempt counted" in d
               for d in details), details
    ranks = [r["pid"] for g in call(cluster["handle"], "gangs_info") for r in g["ranks"]]
    assert not set(victims) & set(ranks)
