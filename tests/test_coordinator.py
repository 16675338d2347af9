"""The coordinator's event loop stays free for scheduling and every other call while a slow store read runs, on a
real local Ray."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import ray
from support import local_daemon

from l2cluster.results.store import Store
from l2cluster.states import JobState

pytestmark = pytest.mark.slow  # a local Ray, and a store of 60,000 jobs

EXPERIMENT = "big-00000000"
NUM_JOBS = 60_000  # `status` of the experiment reads them in ~0.6 s on one core
MIN_ANSWERED = 5  # pings answered while it reads (a few ms each: dozens when the loop is free)


@dataclass
class _Config:
    """Stands in for a TrainConfig: what Store.add_experiment reads of one."""

    data: dict

    def model_dump(self, mode: str = "python") -> dict:
        return self.data


@dataclass
class _Job:
    """Stands in for a sweep.Job (validating 60,000 configs would take longer than the test)."""

    id: str
    seed: int
    label: str = "big"
    overrides: dict = field(default_factory=dict)
    group: str = "0" * 16
    plugins: dict = field(default_factory=dict)
    config: _Config = field(default_factory=lambda: _Config({"epochs": 1, "scaling": {"num_workers": 1}}))


def _big_store(path) -> None:
    """One experiment of NUM_JOBS ended jobs (cancelled: nothing for the coordinator to schedule)."""
    jobs = [_Job(f"{i:016x}", seed=i) for i in range(NUM_JOBS)]
    store = Store(path)
    try:
        store.add_experiment(EXPERIMENT, "big", {}, jobs)
        for job in jobs:
            store.transition(job.id, JobState.CANCELLED, detail="cancelled while queued")
    finally:
        store.close()


def test_a_slow_store_read_does_not_hold_up_other_calls(tmp_path):
    """`status` of a large experiment reads in a worker thread: other calls (here `ping`, one after another) are
    answered while it reads. The control, run by hand with the read back on the event loop: 1 ping was answered
    meanwhile (the first, which Ray ran before the status), against hundreds with the read in a worker thread."""
    _big_store(tmp_path / "store.db")
    with local_daemon(tmp_path / "store.db", num_cpus=1) as cluster:
        handle = cluster["handle"]
        slow = handle.status.remote(EXPERIMENT)
        answered_meanwhile = 0
        while True:
            assert ray.get(handle.ping.remote(), timeout=60)["running"] == 0
            if ray.wait([slow], timeout=0)[0]:
                break
            answered_meanwhile += 1
        assert answered_meanwhile >= MIN_ANSWERED, "other calls waited for the status read: it held up the event loop"
        jobs = ray.get(slow)
        assert len(jobs) == NUM_JOBS and {j["state"] for j in jobs} == {JobState.CANCELLED.value}
        # `logs` reads through a worker thread too, and answers as before.
        assert ray.get(handle.logs.remote(jobs[0]["job"]), timeout=60)["job"]["state"] == JobState.CANCELLED.value


SWEEP_SEEDS = 1000  # × 5 strengths: 5,000 jobs, ~0.8 s to validate, expand and insert on one core


def test_a_large_submit_does_not_hold_up_other_calls(tmp_path):
    """A 5,000-job sweep is validated, expanded and stored in a worker thread: other calls are answered meanwhile.
    The control, run by hand with that work back on the event loop: 1 ping was answered meanwhile (the first)."""
    spec = {"name": "wide", "epochs": 1, "optimizer": {"name": "adam", "lr": 1e-3},
            "regularizers": [{"name": "l2", "strength": 1e-4}],
            # Two ranks on a one-CPU cluster: no job can ever be placed, so each fails from the queue untrained.
            "scaling": {"num_workers": 2},
            "sweep": {"seeds": list(range(SWEEP_SEEDS)),
                      "grid": {"regularizers.0.strength": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]}}}
    with local_daemon(tmp_path / "store.db", num_cpus=1) as cluster:
        handle = cluster["handle"]
        ray.get(handle.ping.remote(), timeout=60)
        slow = handle.submit.remote(spec)
        answered_meanwhile = 0
        while True:
            ray.get(handle.ping.remote(), timeout=60)
            if ray.wait([slow], timeout=0)[0]:
                break
            answered_meanwhile += 1
        out = ray.get(slow)
        assert (out["jobs"], out["new"]) == (5 * SWEEP_SEEDS, 5 * SWEEP_SEEDS)
        assert answered_meanwhile >= MIN_ANSWERED, "other calls waited for the submit: it held up the event loop"
        # The jobs were stored by the worker thread's connection and are seen by the coordinator's own.
        assert len(ray.get(handle.status.remote(out["experiment"]), timeout=120)) == 5 * SWEEP_SEEDS
