"""The scheduler's plan on plain records (no Ray): reuse, new gangs, failures, releases, priority and the
anti-starvation reservation."""

from __future__ import annotations

import pytest

from l2cluster.cluster.scheduler import (
    Cluster,
    Fail,
    GangShape,
    GangView,
    NewGang,
    QueuedPack,
    Release,
    Resources,
    Start,
    plan,
)

ONE_CPU = GangShape(1, 1.0, 0.0)
TWO_RANKS = GangShape(2, 1.0, 0.0)
FOUR_CPUS = GangShape(4, 1.0, 0.0)
ONE_GPU = GangShape(1, 1.0, 1.0)


def cluster(cpus: float, free_cpus: float, gpus: float = 0.0, free_gpus: float = 0.0) -> Cluster:
    return Cluster(Resources(cpus, gpus), Resources(free_cpus, free_gpus))


def started(actions) -> list[str]:
    return [a.head for a in actions if isinstance(a, Start)]


def test_resources_of_a_shape_fits_and_counts():
    assert Resources.of(GangShape(2, 1.5, 0.5)) == Resources(3.0, 1.0)
    assert Resources(4, 0).fits(Resources.of(FOUR_CPUS)) and not Resources(3.5, 0).fits(Resources.of(FOUR_CPUS))
    assert Resources(0.3, 0).fits(Resources(0.1 + 0.2, 0))  # float arithmetic: within a tolerance
    assert Resources(8, 1).count(Resources.of(ONE_GPU)) == 1 and Resources(8, 0).count(Resources.of(TWO_RANKS)) == 4
    assert Resources(1, 0).count(Resources.of(FOUR_CPUS)) == 1  # never 0: a pack is never split for want of room


def test_an_idle_gang_of_the_shape_is_reused_not_a_new_one():
    gangs = [GangView("busy", ONE_CPU, ready=True, busy=True), GangView("idle", ONE_CPU, ready=True, busy=False)]
    actions = plan([QueuedPack("a", ONE_CPU)], gangs, cluster(4, 0))
    assert actions == [Start("a", "idle")]


def test_each_idle_gang_is_used_once_then_new_gangs_while_there_is_room():
    gangs = [GangView("idle", ONE_CPU, ready=True, busy=False)]
    queued = [QueuedPack(j, ONE_CPU) for j in "abcd"]
    actions = plan(queued, gangs, cluster(4, 2))
    assert actions == [Start("a", "idle"), Start("b", NewGang(ONE_CPU)), Start("c", NewGang(ONE_CPU))]


def test_a_pack_larger_than_the_whole_cluster_fails_every_member_with_the_reason():
    actions = plan([QueuedPack("a", GangShape(8, 1.0, 0.0), ("a", "b")), QueuedPack("c", ONE_CPU)], [],
                   cluster(4, 4))
    fails = [a for a in actions if isinstance(a, Fail)]
    assert [f.job_id for f in fails] == ["a", "b"]
    assert "needs 8 CPU(s) and 0 GPU(s); the whole cluster has 4 CPU(s) and 0 GPU(s)" in fails[0].reason
    assert started(actions) == ["c"]  # a job that can never run reserves nothing


def test_a_job_that_requires_a_gpu_fails_on_a_cluster_without_one():
    (fail,) = plan([QueuedPack("a", ONE_CPU, requires_gpu=True)], [], cluster(4, 4))
    assert isinstance(fail, Fail) and "(scaling.use_gpu: true)" in fail.reason


def test_an_idle_gang_of_another_shape_is_released_to_make_room_and_planning_stops():
    gangs = [GangView("newer", ONE_CPU, ready=True, busy=False, idle_since=20.0),
             GangView("older", TWO_RANKS, ready=True, busy=False, idle_since=10.0)]
    actions = plan([QueuedPack("big", FOUR_CPUS), QueuedPack("small", GangShape(1, 0.5, 0.0))], gangs,
                   cluster(4, 1))
    assert actions == [Release("older", "room for another shape")]  # the one idle longest; nothing after it


def test_a_gang_still_forming_is_not_released():
    gangs = [GangView("forming", ONE_CPU, ready=False, busy=True)]
    assert plan([QueuedPack("big", FOUR_CPUS)], gangs, cluster(4, 0)) == []


def test_the_queue_order_decides_who_gets_the_room():
    """plan() takes the queue in priority order: the first pack that fits takes the room."""
    queued = [QueuedPack("high", TWO_RANKS), QueuedPack("low", TWO_RANKS)]
    assert started(plan(queued, [], cluster(4, 2))) == ["high"]
    assert started(plan(queued[::-1], [], cluster(4, 2))) == ["low"]


def test_small_jobs_do_not_take_the_cpus_a_blocked_large_job_waits_for():
    """4 CPUs, 2 busy: a queued 4-CPU job, then many 1-CPU jobs. The 2 free CPUs are the blocked job's: without the
    reservation the 1-CPU jobs would take them tick after tick and the 4-CPU job would never start."""
    queued = [QueuedPack("big", FOUR_CPUS)] + [QueuedPack(f"small{i}", ONE_CPU) for i in range(10)]
    assert plan(queued, [], cluster(4, 2)) == []
    # Once the busy CPUs are free, the big job starts first and the small ones wait for it.
    assert plan(queued, [], cluster(4, 4)) == [Start("big", NewGang(FOUR_CPUS))]


def test_later_jobs_still_use_what_is_left_after_the_reservation():
    queued = [QueuedPack("big", FOUR_CPUS)] + [QueuedPack(f"small{i}", ONE_CPU) for i in range(3)]
    # 8 CPUs, 3 free: the big job reserves all 3 (it needs 4) and nothing else starts.
    assert started(plan(queued, [], cluster(8, 3))) == []
    # A blocked GPU job reserves the CPUs it needs (1), not all of them: CPU jobs take the others.
    queued = [QueuedPack("gpu", ONE_GPU)] + [QueuedPack(f"small{i}", ONE_CPU) for i in range(5)]
    assert started(plan(queued, [], cluster(8, 3, gpus=1, free_gpus=0))) == ["small0", "small1"]


def test_an_idle_gang_a_later_job_could_reuse_is_released_for_the_blocked_job():
    gangs = [GangView("idle", ONE_CPU, ready=True, busy=False)]
    queued = [QueuedPack("big", FOUR_CPUS), QueuedPack("small", ONE_CPU)]
    assert plan(queued, gangs, cluster(4, 2)) == [Release("idle", "room for another shape")]


def test_only_the_first_blocked_job_reserves():
    """A second blocked job reserves nothing more: a job after it that fits in what is left still starts."""
    queued = [QueuedPack("gpu", ONE_GPU), QueuedPack("big", FOUR_CPUS), QueuedPack("small", ONE_CPU)]
    assert started(plan(queued, [], cluster(8, 3, gpus=1, free_gpus=0))) == ["small"]


@pytest.mark.parametrize("reserve", [False, True])
def test_the_starvation_test_fails_without_the_reservation(reserve, monkeypatch):
    """The control: with the reservation switched off (a blocked job reserves nothing), the small jobs take the
    free CPUs — what the starvation test above would catch."""
    import l2cluster.cluster.scheduler as scheduler

    if not reserve:
        monkeypatch.setattr(scheduler.Resources, "capped", lambda self, limit: scheduler.Resources())
    queued = [QueuedPack("big", FOUR_CPUS)] + [QueuedPack(f"small{i}", ONE_CPU) for i in range(10)]
    assert started(plan(queued, [], cluster(4, 2))) == ([] if reserve else ["small0", "small1"])
