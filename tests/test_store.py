"""The SQLite store and the job state table: every change is checked and recorded, results are written once,
what was stored survives reopening, and a bad store file is refused without being touched."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest
from support import registry

from l2cluster.packing import pack_key
from l2cluster.records import JobResult
from l2cluster.results.store import SCHEMA_VERSION, Store, StoreError, shape_json
from l2cluster.spec import expand, parse_spec
from l2cluster.states import TRANSITIONS, InvalidTransition, JobState, Outcome, check_transition

SPEC = {"name": "s", "optimizer": {"name": "adam"}, "epochs": 1,
        "sweep": {"seeds": [0, 1], "grid": {"optimizer.lr": [1e-3, 2e-3]}}}


def _jobs(spec=SPEC):
    return expand(parse_spec(spec, registry()), registry())


def test_transition_table():
    assert {s for s in JobState if s.is_terminal} == {JobState.SUCCEEDED, JobState.FAILED, JobState.DIVERGED,
                                                      JobState.CANCELLED}
    # An ended job goes nowhere but back to the queue, and only on a rerun (Store.rerun).
    assert all(TRANSITIONS[s] == {JobState.QUEUED} for s in JobState if s.is_terminal)
    assert check_transition("j", "queued", "placing") is JobState.PLACING
    assert check_transition("j", "running", "queued") is JobState.QUEUED  # a retry
    with pytest.raises(InvalidTransition, match="job j: queued → running is not a valid transition"):
        check_transition("j", "queued", "running")
    with pytest.raises(InvalidTransition):
        check_transition("j", "succeeded", "running")


def test_jobs_flow_through_states_and_everything_survives_reopening(tmp_path):
    path = tmp_path / "store" / "l2cluster.db"
    store = Store(path)
    jobs = _jobs()
    assert store.add_experiment("s-1", "s", SPEC, jobs, priority=0, now=100.0) == 4
    assert store.add_experiment("s-1", "s", SPEC, jobs, priority=0) == 0  # resubmission adds nothing
    first = jobs[0].id
    store.transition(first, "placing", node="node-a")
    store.transition(first, "running")
    store.record_epoch(first, 1, {"epoch": 1, "val_acc": 0.5})
    store.transition(first, "queued", detail="rank 1 died")  # retry
    store.transition(first, "placing")
    store.transition(first, "running")
    store.record_epoch(first, 1, {"epoch": 1, "val_acc": 0.6})  # the retry overwrites its epoch
    store.finish(first, JobResult(Outcome.SUCCEEDED, {"test_acc": 0.9}))
    with pytest.raises(ValueError, match="already recorded"):
        store.finish(first, JobResult(Outcome.SUCCEEDED, {"test_acc": 0.9}))
    with pytest.raises(InvalidTransition):
        store.transition(jobs[1].id, "running")
    store.close()

    again = Store(path)
    row = again.job(first)
    assert (row["state"], row["attempts"], row["node"], row["epoch"]) == ("succeeded", 2, "node-a", 1)
    assert row["started_at"] <= row["finished_at"]
    assert again.epochs(first) == [{"epoch": 1, "val_acc": 0.6}]
    assert again.result(first) == {"outcome": "succeeded", "final": {"test_acc": 0.9}, "diverged_epoch": None,
                                   "error": None}
    assert [(e["old_state"], e["new_state"]) for e in again.events(first)] == [
        (None, "queued"), ("queued", "placing"), ("placing", "running"), ("running", "queued"),
        ("queued", "placing"), ("placing", "running"), ("running", "succeeded")]
    assert again.counts("s-1") == {"queued": 3, "succeeded": 1}
    assert [e["id"] for e in again.experiments()] == ["s-1"]


def test_queue_order_is_priority_then_submission(tmp_path):
    store = Store(tmp_path / "db")
    low = _jobs()
    high = _jobs({**SPEC, "name": "urgent"})
    store.add_experiment("low", "s", SPEC, low, priority=0)
    store.add_experiment("high", "urgent", SPEC, high, priority=5)
    order = [r["id"] for r in store.queued()]
    assert order == [j.id for j in high] + [j.id for j in low]
    store.transition(high[0].id, "cancelled")
    assert [r["id"] for r in store.queued(limit=2)] == [j.id for j in high[1:3]]


def test_store_file_is_owner_only(tmp_path):
    Store(tmp_path / "db").close()
    assert stat.S_IMODE(os.stat(tmp_path / "db").st_mode) == 0o600


def test_a_corrupt_store_is_refused_and_left_untouched(tmp_path):
    bad = tmp_path / "db"
    bad.write_bytes(b"this is not sqlite" * 100)
    before = bad.read_bytes()
    with pytest.raises(StoreError, match="not a healthy l2cluster store .* left untouched"):
        Store(bad)
    assert bad.read_bytes() == before


def test_a_locked_store_is_a_clear_error(tmp_path):
    path = tmp_path / "db"
    Store(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="another process may hold it locked"):
            Store(path, timeout=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_finish_is_atomic(tmp_path):
    store = Store(tmp_path / "db")
    jobs = _jobs()
    store.add_experiment("s-1", "s", SPEC, jobs)
    with pytest.raises(InvalidTransition):  # queued → succeeded is not allowed: the result must not stay behind
        store.finish(jobs[0].id, JobResult(Outcome.SUCCEEDED, {"test_acc": 0.9}))
    assert store.result(jobs[0].id) is None and store.job(jobs[0].id)["state"] == "queued"


def test_a_job_shared_by_two_submissions_runs_once_and_shows_in_both(tmp_path):
    """Extending a sweep's seeds: the jobs already there keep their results and belong to both experiments."""
    store = Store(tmp_path / "s.db")
    first = _jobs({**SPEC, "sweep": {"seeds": [0]}})
    second = _jobs({**SPEC, "sweep": {"seeds": [0, 1]}})
    assert store.add_experiment("s-1", "s", {}, first) == 1
    store.transition(first[0].id, JobState.PLACING)
    store.transition(first[0].id, JobState.RUNNING)
    store.finish(first[0].id, JobResult(Outcome.SUCCEEDED, {"test_acc": 0.5}))
    assert store.add_experiment("s-2", "s", {}, second) == 1  # only seed 1 is new
    assert [j["id"] for j in store.jobs("s-1")] == [first[0].id]
    assert [j["id"] for j in store.jobs("s-2")] == [j.id for j in second]
    assert store.counts("s-2") == {"succeeded": 1, "queued": 1}
    assert [j["id"] for j in store.queued()] == [second[1].id]


def test_a_schema_1_store_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.db"
    store = Store(path)
    store.add_experiment("s-1", "s", {}, _jobs())
    store._db.execute("DELETE FROM experiment_jobs")
    store._db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    store.close()
    store = Store(path)
    assert len(store.jobs("s-1")) == 4
    assert store._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_a_schema_2_store_gains_the_packing_columns_and_its_queue_is_packable(tmp_path):
    path = tmp_path / "old.db"
    store = Store(path)
    jobs = _jobs()
    store.add_experiment("s-1", "s", {}, jobs)
    for column in ("pack_key", "shape_json", "pack_id"):
        store._db.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    store._db.execute("DROP TABLE packs")
    store._db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    store.close()
    store = Store(path)
    rows = store.queued()
    assert len(rows) == 4 and all(r["pack_id"] is None for r in rows)
    assert [r["pack_key"] for r in rows] == [pack_key(j.config.model_dump(mode="json")) for j in jobs]
    assert rows[0]["pack_key"] is not None and rows[0]["shape_json"] == shape_json(jobs[0].config.model_dump())
    store.start_pack("ab" * 8, [rows[0]["id"], rows[1]["id"]])
    assert store.pack_members("ab" * 8) == [rows[0]["id"], rows[1]["id"]]
    assert store.job(rows[1]["id"])["pack_id"] == "ab" * 8


def test_the_final_result_carries_the_whole_epoch_history(tmp_path):
    """Epoch reports can be lost with a coordinator; the history written with the result fills the gaps."""
    store = Store(tmp_path / "s.db")
    (job, *_) = _jobs()
    store.add_experiment("s-1", "s", {}, _jobs())
    store.transition(job.id, JobState.PLACING)
    store.transition(job.id, JobState.RUNNING)
    store.record_epoch(job.id, 2, {"epoch": 2, "val_acc": 0.5})  # epoch 1's report never arrived
    history = [{"epoch": 1, "val_acc": 0.4}, {"epoch": 2, "val_acc": 0.5}, {"epoch": 3, "val_acc": 0.6}]
    store.finish(job.id, JobResult(Outcome.SUCCEEDED, {"val_acc": 0.6}, epochs=history), attempt=2)
    assert store.epochs(job.id) == history
