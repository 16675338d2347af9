"""The records that cross Ray: complete on every path, and unchanged by the trip (pickling, as Ray sends them)."""

from __future__ import annotations

import pickle

import pytest

from l2cluster.records import JobResult, RankInfo, RankOutcome
from l2cluster.states import JobState, Outcome


def test_outcomes_are_the_terminal_states_by_the_same_names():
    assert {o.state for o in Outcome} == {s for s in JobState if s.is_terminal}
    assert all(o.value == o.state.value for o in Outcome)


def test_a_failure_without_numbers_is_a_complete_result():
    failed = JobResult.failed("RuntimeError: boom")
    assert (failed.outcome, failed.final, failed.error, failed.diverged_epoch, failed.epochs,
            failed.resumed_from_epoch) == (Outcome.FAILED, {}, "RuntimeError: boom", None, [], 0)


def test_an_outcome_is_checked_when_the_result_is_made():
    assert JobResult("diverged", diverged_epoch=2).outcome is Outcome.DIVERGED
    with pytest.raises(ValueError, match="running"):
        JobResult("running")  # the trainer's state of a model still training


def test_records_survive_the_trip_across_processes():
    result = JobResult(Outcome.SUCCEEDED, {"test_acc": 0.9}, epochs=[{"epoch": 1, "val_acc": 0.8}],
                       resumed_from_epoch=1)
    out = RankOutcome({"0" * 16: result}, resumed_from_epoch=1)
    back = pickle.loads(pickle.dumps(out))
    assert back == out and back.results["0" * 16].outcome is Outcome.SUCCEEDED and not back.crashed
    crashed = RankOutcome(error="OSError: disk", traceback="Traceback …")
    assert pickle.loads(pickle.dumps(crashed)).crashed
    info = RankInfo(pid=1, node="127.0.0.1/abcdef", rank=0, gpu_bytes=None, process_groups_started=1, jobs_run=3)
    assert pickle.loads(pickle.dumps(info)) == info
