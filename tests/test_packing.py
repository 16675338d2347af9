"""Packing: which jobs share a pack, and that a member of a pack ends exactly as the same job trained alone —
in one process, in a 2-rank gloo pack, after a resume from the pack's checkpoint — and ends alone when it
diverges, its plugin fails or it is cancelled, while the other members go on."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import BaseModel, ConfigDict
from support import InfPenalty, NanPenalty, config, params_of, registry, synthetic_splits

from l2cluster.ids import pack_id
from l2cluster.packing import (
    CPU_DEFAULT_MAX_PACK,
    GPU_DEFAULT_MAX_PACK,
    group_into_packs,
    max_members,
    member_bytes,
    pack_key,
)
from l2cluster.plugin import Regularizer
from l2cluster.records import JobResult
from l2cluster.registry import Registry, load_builtins
from l2cluster.states import Outcome
from l2cluster.training.runner import Member, run_pack
from l2cluster.training.trainer import Trainer

# 330 examples at batch 32: 11 steps an epoch (the last one short), 3 epochs.
BASE = dict(model={"hidden_sizes": [24, 12], "dtype": "float64"}, data={"batch_size": 32, "val_size": 64},
            epochs=3, optimizer={"name": "adam", "lr": 3e-3})
# The members differ in seed and in every numeric setting of every built-in.
SETTINGS = [
    dict(seed=0, l2=1e-3, wd=0.0, p=0.1, clip=0.5),
    dict(seed=1, l2=0.0, wd=0.05, p=0.3, clip=5.0),
    dict(seed=2, l2=3e-2, wd=0.01, p=0.0, clip=0.05),
]
TIMINGS = {"train_s", "epoch_s"}


def member_config(seed, l2, wd, p, clip, reg=None, **extra):
    return config(reg, seed=seed, regularizers=[
        {"name": "l2", "strength": l2}, {"name": "decoupled_decay", "weight_decay": wd},
        {"name": "dropout", "p": p}, {"name": "grad_clip", "max_norm": clip}, *extra.pop("more", [])],
        **{**BASE, **extra})


def members(reg=None, settings=SETTINGS, **extra):
    return [Member(f"{i:016x}", member_config(reg=reg, **s, **extra)) for i, s in enumerate(settings)]


def splits():
    return synthetic_splits(n_train=330)


def comparable(result: JobResult) -> dict:
    """A job result without its wall-clock timings."""
    final = {k: v for k, v in result.final.items() if k not in TIMINGS}
    epochs = [{k: v for k, v in e.items() if k not in TIMINGS} for e in result.epochs]
    return {"outcome": result.outcome, "final": final, "epochs": epochs, "error": result.error}


def assert_same_run(a: dict, b: dict, rel=1e-9) -> None:
    a, b = comparable(a), comparable(b)
    assert a["outcome"] == b["outcome"] and a["error"] == b["error"]
    assert len(a["epochs"]) == len(b["epochs"])
    for ea, eb in zip(a["epochs"], b["epochs"]):
        assert ea.keys() == eb.keys()
        for key in ea:
            assert ea[key] == pytest.approx(eb[key], rel=rel, abs=1e-12), key
    for key, value in a["final"].items():
        assert value == pytest.approx(b["final"][key], rel=rel, abs=1e-12), key


def solo(member: Member, reg=None, **options) -> dict:
    return run_pack([member], splits(), reg or registry(), device=torch.device("cpu"), **options).results[
        member.job_id]


# -- which jobs pack together ---------------------------------------------------------------------------------
def test_pack_keys_ignore_seed_and_numeric_settings_and_respect_the_opt_out():
    a, b, c = (m.config.model_dump(mode="json") for m in members())
    assert pack_key(a) == pack_key(b) == pack_key(c) is not None
    assert pack_key(a) != pack_key({**a, "epochs": 4})
    assert pack_key(a) != pack_key({**a, "optimizer": {**a["optimizer"], "lr": 1e-2}})  # one lr per stack
    other = member_config(**SETTINGS[0]).model_dump(mode="json")
    other["regularizers"][0]["exclude_bias_and_1d"] = False  # a non-numeric setting
    assert pack_key(other) != pack_key(a)
    assert pack_key({**a, "scaling": {**a["scaling"], "pack": False}}) is None
    assert pack_key({**a, "schedule": {"name": "plateau"}}) is None
    # max_attempts and the opt-out are not part of a job's identity; the seed is
    m0 = members()[0].config
    assert m0.model_copy(update={"max_attempts": 7}).model_dump(mode="json")["max_attempts"] == 7


def test_packs_take_same_key_jobs_in_queue_order_up_to_the_limit():
    jobs = ["a1", "b1", "a2", "x", "a3", "b2", "a4"]
    key = lambda j: None if j == "x" else j[0]  # noqa: E731
    assert group_into_packs(jobs, 3, key) == [["a1", "a2", "a3"], ["b1", "b2"], ["x"], ["a4"]]
    assert group_into_packs(jobs, 1, key) == [[j] for j in jobs]
    assert pack_id(["0" * 16]) == "0" * 16 and len(pack_id(["0" * 16, "1" * 16])) == 16


def test_pack_size_comes_from_the_device():
    cfg = config(model={"hidden_sizes": [512, 256, 128]}).model_dump(mode="json")
    assert max_members(cfg, gpu_bytes=None) == CPU_DEFAULT_MAX_PACK
    assert max_members(cfg, gpu_bytes=None, cap=64) == 64 and max_members(cfg, gpu_bytes=None, cap=1) == 1
    h100 = 80 * 2**30
    assert max_members(cfg, gpu_bytes=h100) == GPU_DEFAULT_MAX_PACK  # ~20 MB a member: memory is not the limit
    assert max_members(cfg, gpu_bytes=h100, cap=64) == 64
    big = config(model={"hidden_sizes": [8192, 8192]}).model_dump(mode="json")
    assert member_bytes(big) > 2e9 and max_members(big, gpu_bytes=h100) == int(h100 * 0.5 // member_bytes(big))
    assert max_members(big, gpu_bytes=2**30) == 1


# -- a member of a pack ends as it would alone ---------------------------------------------------------------
def test_a_pack_trains_each_member_exactly_as_alone():
    pack = members()
    packed = run_pack(pack, splits(), registry(), device=torch.device("cpu"))
    assert set(packed.results) == {m.job_id for m in pack} and not packed.split
    for m in pack:
        assert_same_run(packed.results[m.job_id], solo(m))
        assert packed.results[m.job_id].outcome is Outcome.SUCCEEDED
    # and the parameters themselves: member k's slice of the stack equals the solo model
    stacked = Trainer([m.config for m in pack], splits(), registry(), device="cpu")
    stacked.fit()
    for k, m in enumerate(pack):
        alone = Trainer([m.config], splits(), registry(), device="cpu")
        alone.fit()
        for name, p in params_of(alone, 0).items():
            assert torch.allclose(params_of(stacked, k)[name], p, rtol=1e-9, atol=1e-12), (k, name)
    # a control: members really differ (a test comparing equal runs would pass for the wrong reason)
    sums = [packed.results[m.job_id].final["param_sum"] for m in pack]
    assert len(set(sums)) == 3


def test_a_pack_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(tmp_path):
    pack = members()
    full = run_pack(pack, splits(), registry(), device=torch.device("cpu"))

    class Lost(Exception):
        pass

    def die_after_epoch_2(job_id, epoch, metrics):
        if epoch == 2:
            raise Lost  # the process is lost after its checkpoint of epoch 2 is on disk

    with pytest.raises(Lost):
        run_pack(pack, splits(), registry(), device=torch.device("cpu"), checkpoint_dir=str(tmp_path),
                 on_epoch=die_after_epoch_2)
    pid = pack_id([m.job_id for m in pack])
    assert sorted(os.listdir(tmp_path / pid)) == ["epoch-00001.rank-0.pt", "epoch-00002.rank-0.pt"]
    resumed = run_pack(pack, splits(), registry(), device=torch.device("cpu"), checkpoint_dir=str(tmp_path))
    assert resumed.resumed_from_epoch == 2
    for m in pack:
        a, b = resumed.results[m.job_id], full.results[m.job_id]
        assert comparable(a) == comparable(b)  # bit for bit
    assert not (tmp_path / pid).exists()  # the finished pack's checkpoints are gone


# -- a member ends alone ---------------------------------------------------------------------------------------
class _At(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: float = 1e9  # per member: the limit below which the hook raises


class Raises(Regularizer):
    """Raises whenever some member's `at` is below 1: the whole stack fails, and the pack splits."""

    name = "raises"
    Config = _At

    def penalty(self, params, hp):
        if bool((hp.at < 1).any()):
            raise ValueError("at below 1 is not supported")
        return params["layers.0.weight"].flatten(1).sum(1) * 0


def _registry() -> Registry:
    reg = Registry()
    load_builtins(reg)
    for plugin in (InfPenalty, NanPenalty, Raises):
        reg.register(plugin, "test")
    return reg


@pytest.mark.parametrize(("plugin", "field", "bad", "outcome", "error"), [
    ("inf_penalty", "at_step", 15, "diverged", "loss became non-finite in epoch 2"),
    ("nan_penalty", "at_step", 15, "failed",
     "plugin 'nan_penalty', hook 'penalty': returned NaN from finite parameters in epoch 2"),
    ("raises", "at", 0.5, "failed", "plugin 'raises', hook 'penalty': ValueError: at below 1 is not supported"),
])
def test_a_member_that_diverges_or_whose_plugin_fails_ends_alone(plugin, field, bad, outcome, error):
    reg = _registry()
    ats = [10**9, bad, 10**9]
    pack = [Member(m.job_id, member_config(reg=reg, **s, more=[{"name": plugin, field: at}]))
            for m, s, at in zip(members(), SETTINGS, ats)]
    reported = []
    run = run_pack(pack, splits(), reg, device=torch.device("cpu"), on_result=lambda j, r: reported.append(j))
    assert run.split == (plugin == "raises")
    bad_job = pack[1].job_id
    assert run.results[bad_job].outcome == outcome
    assert run.results[bad_job].error.startswith(error)
    if plugin != "raises":
        assert reported[0] == bad_job  # reported as soon as it ended, while the others trained on
        assert len(run.results[bad_job].epochs) == 2
    for k in (0, 2):
        good = run.results[pack[k].job_id]
        assert good.outcome is Outcome.SUCCEEDED
        assert_same_run(good, solo(pack[k], reg))


def test_cancelling_one_member_stops_only_that_member():
    pack = members()
    steps = []

    def cancelled():
        steps.append(1)
        return {pack[1].job_id} if len(steps) > 15 else set()

    run = run_pack(pack, splits(), registry(), device=torch.device("cpu"), cancelled=cancelled)
    assert run.results[pack[1].job_id].outcome is Outcome.CANCELLED
    assert len(run.results[pack[1].job_id].epochs) == 1  # 11 steps an epoch: stopped in epoch 2
    for k in (0, 2):
        assert_same_run(run.results[pack[k].job_id], solo(pack[k]))
    everything = run_pack(pack, splits(), registry(), device=torch.device("cpu"), cancelled=lambda: True)
    assert {r.outcome for r in everything.results.values()} == {Outcome.CANCELLED}


def test_members_already_ended_ride_along_without_results():
    pack = members()
    run = run_pack(pack, splits(), registry(), device=torch.device("cpu"), done={pack[0].job_id})
    assert set(run.results) == {pack[1].job_id, pack[2].job_id}
    assert_same_run(run.results[pack[2].job_id], solo(pack[2]))


# -- a 2-rank DDP pack -----------------------------------------------------------------------------------------
NO_DROPOUT = [{**s, "p": 0.0} for s in SETTINGS]


def _rank_main(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        cpu = torch.device("cpu")
        saved = {
            "pack": run_pack(members(), splits(), registry(), device=cpu, rank=rank, world=world).results,
            "solo": {m.job_id: run_pack([m], splits(), registry(), device=cpu, rank=rank, world=world)
                     .results[m.job_id] for m in members()},
            "no_dropout": run_pack(members(settings=NO_DROPOUT), splits(), registry(), device=cpu, rank=rank,
                                   world=world).results,
        }
        torch.save(saved, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see tests/test_ddp.py: gloo's teardown can abort a finished process


def test_a_two_rank_pack_equals_two_rank_solo_runs_and_the_single_process_pack(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path)), nprocs=2, join=True)
    # weights_only=False: the files hold JobResults, written by this test's own ranks
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    single = run_pack(members(settings=NO_DROPOUT), splits(), registry(), device=torch.device("cpu")).results
    for got in ranks:
        for m in members():
            assert got["pack"][m.job_id].outcome is Outcome.SUCCEEDED
            assert_same_run(got["pack"][m.job_id], got["solo"][m.job_id])
            # Without dropout (each rank draws its own masks) two ranks compute the single process's global batch.
            assert_same_run(got["no_dropout"][m.job_id], single[m.job_id], rel=1e-8)
