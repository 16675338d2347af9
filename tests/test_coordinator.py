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
