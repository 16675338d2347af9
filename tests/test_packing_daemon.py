"""Packs through a real daemon (a local Ray, a coordinator, warm gangs): a sweep's jobs train as one pack and
every member stays a job of its own — its own row, epochs, result, outcome and attempts — ending as the same
job trained alone; cancelling one member stops only it; a pack that loses a rank, or its coordinator, resumes
with the same members from its checkpoints and ends as an undisturbed twin."""

from __future__ import annotations

import os
import signal

import pytest
from support import call, finished, local_daemon, wait_for

from l2cluster.results.store import Store
from l2cluster.states import JobState

pytestmark = pytest.mark.slow

# float64, so a member of a pack and the same job alone agree to rounding (allclose, not bit for bit: a stack of
# K runs other kernels than one model). Dropout makes every member's random streams part of what must match.
JOB = {"model": {"hidden_sizes": [32], "dtype": "float64"}, "epochs": 4,
       "data": {"batch_size": 20, "val_size": 500, "train_size": 1500},
       "optimizer": {"name": "adam", "lr": 0.003},
       "regularizers": [{"name": "l2", "strength": 1e-4}, {"name": "dropout", "p": 0.1}],
       "sweep": {"seeds": [0, 1], "grid": {"regularizers.l2.strength": [1e-4, 1e-2]}}}
TIMINGS = {"train_s", "epoch_s"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, mnist_dir):
    with local_daemon(tmp_path_factory.mktemp("pk") / "store.db", num_cpus=2, data_dir=str(mnist_dir),
                      max_pack=4) as c:
        c["store_reader"] = Store(c["store"])
        yield c


def submit(cluster, name, **fields):
    return call(cluster["handle"], "submit", {"name": name, **JOB, **fields})["experiment"]


def wait_finished(cluster, experiment):
    return wait_for(lambda: finished(cluster, experiment), f"{experiment} to finish", timeout_s=300)


def by_setting(cluster, jobs):
    """{(strength, seed): (outcome, final without timings, per-epoch metrics without timings)}."""
    store = cluster["store_reader"]
    out = {}
    for j in jobs:
        result = store.result(j["job"])
        final = {k: v for k, v in result["final"].items() if k not in TIMINGS}
        epochs = [{k: v for k, v in e.items() if k not in TIMINGS} for e in store.epochs(j["job"])]
        out[(j["overrides"]["regularizers.l2.strength"], j["seed"])] = (result["outcome"], final, epochs)
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        (oa, fa, ea), (ob, fb, eb) = a[key], b[key]
        assert oa == ob == "succeeded", key
        assert [e["epoch"] for e in ea] == [e["epoch"] for e in eb] == [1, 2, 3, 4]
        for x, y in [(fa, fb), *zip(ea, eb)]:
            for name, value in x.items():
                assert value == pytest.approx(y[name], rel=1e-9, abs=1e-12), (key, name)


def test_a_sweep_trains_in_packs_and_each_member_equals_the_job_alone(cluster):
    store = cluster["store_reader"]
    packed = wait_finished(cluster, submit(cluster, "pk"))
    packs = {j["pack"] for j in packed}
    # Four jobs, room for two gangs at once: two packs of two, one per gang (not one pack of four and an idle CPU).
    assert len(packed) == 4 and len(packs) == 2 and not packs & {j["job"] for j in packed}
    assert sorted(len(store.pack_members(p)) for p in packs) == [2, 2]
    for j in packed:
        assert j["state"] == "succeeded" and j["attempts"] == 1
        details = [e["detail"] or "" for e in store.events(j["job"])]
        assert any(d.startswith("in pack ") and d.endswith("with 1 other job(s)") for d in details), details
    alone = wait_finished(cluster, submit(cluster, "pk-alone", scaling={"pack": False}))
    assert all(j["pack"] == j["job"] for j in alone)  # the opt-out: every job its own pack of one
    assert_same(by_setting(cluster, packed), by_setting(cluster, alone))
    # a control: the members differ from each other
    assert len({f["param_sum"] for _, f, _ in by_setting(cluster, packed).values()}) == 4


def test_cancelling_one_member_stops_only_that_member(cluster):
    store = cluster["store_reader"]
    exp = submit(cluster, "pk-cancel", epochs=30)
    jobs = call(cluster["handle"], "status", exp)
    victim = jobs[1]["job"]
    wait_for(lambda: store.job(victim)["epoch"] >= 1, "the pack's first epoch", timeout_s=120)
    assert call(cluster["handle"], "cancel", victim) == 1
    wait_for(lambda: store.job(victim)["state"] == "cancelled", "the member to be cancelled", timeout_s=60)
    others = [j["job"] for j in jobs if j["job"] != victim]
    assert all(store.job(j)["state"] == "running" for j in others)  # the rest of the pack trains on
    assert call(cluster["handle"], "cancel", exp) == 3  # the experiment: both packs stop
    done = wait_finished(cluster, exp)
    assert {j["state"] for j in done} == {"cancelled"}


def test_a_pack_that_loses_a_rank_resumes_with_the_same_members(cluster):
    store = cluster["store_reader"]
    twin = wait_finished(cluster, submit(cluster, "pk-twin", epochs=6))
    exp = submit(cluster, "pk-kill", epochs=6)
    jobs = call(cluster["handle"], "status", exp)
    wait_for(lambda: store.job(jobs[0]["job"])["epoch"] >= 2, "epoch 2 of the pack", timeout_s=120)
    pack = store.job(jobs[0]["job"])["pack_id"]
    gang = next(g for g in call(cluster["handle"], "gangs_info") if g["job"] == pack)
    os.kill(gang["ranks"][0]["pid"], signal.SIGKILL)

    done = wait_finished(cluster, exp)
    hit = [j for j in done if j["pack"] == pack]
    assert len(hit) == 2 and store.pack_members(pack) == [j["job"] for j in hit]  # the same members, same pack
    assert all(j["state"] == "succeeded" and j["attempts"] == 1 for j in done if j not in hit)
    for j in hit:
        assert j["state"] == "succeeded" and j["attempts"] == 2
        details = [e["detail"] or "" for e in store.events(j["job"])]
        assert any("attempt 1 lost (a rank of its gang died" in d for d in details), details
        resumed = [d for d in details if d.startswith("resumed from the checkpoint of epoch")]
        assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= 2, details
        terminal = [e for e in store.events(j["job"]) if JobState(e["new_state"]).is_terminal]
        assert len(terminal) == 1
    a, b = by_setting(cluster, done), by_setting(cluster, twin)
    assert a == b  # bit for bit: the same pack, resumed exactly
    assert not (cluster["store"].parent / "checkpoints" / pack).exists()
