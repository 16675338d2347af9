"""Checkpoint writes the OS refuses, on real small file systems (a tmpfs mounted for the test; skipped where this
process may not mount): the error names the file and the OS error, no partial file is left, the earlier checkpoint
is intact, and a job whose checkpoints cannot be written trains on to the same result, saying so."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support import config, local_daemon, registry, synthetic_splits, wait_for

from l2cluster.ids import pack_id
from l2cluster.records import JobResult
from l2cluster.training.checkpoint import CheckpointWriteError, JobCheckpoints
from l2cluster.training.runner import Member, _resume, run_pack

JOB = "0123456789abcdef"


def _mount(directory: Path, options: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], check=True,
                   capture_output=True, text=True)


@contextlib.contextmanager
def tmpfs(directory: Path, size: str = "64k"):
    """`directory` as a tmpfs of `size`, unmounted on exit; the test is skipped where mounting is not allowed."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        _mount(directory, f"size={size},mode=0700")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {getattr(e, 'stderr', '') or e}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(directory)], check=True)  # still busy (a process's open file)


def remount_read_only(directory: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True, capture_output=True)


def leftovers(ckpt: JobCheckpoints) -> list[str]:
    return sorted(p.name for p in ckpt.dir.iterdir() if p.name.endswith(".tmp"))


def test_a_full_disk_names_the_file_and_leaves_the_previous_checkpoint_intact(tmp_path):
    with tmpfs(tmp_path / "disk", size="64k") as disk:
        ckpt = JobCheckpoints(disk, JOB, rank=1)
        ckpt.save(1, {"epoch": 1, "w": b"x" * 20_000})  # fits
        with pytest.raises(CheckpointWriteError) as caught:
            ckpt.save(2, {"epoch": 2, "w": b"x" * 200_000})  # does not
        message = str(caught.value)
        assert message == f"cannot write checkpoint {disk / JOB / 'epoch-00002.rank-1.pt'}: [Errno 28] No space " \
                          "left on device"
        assert isinstance(caught.value, OSError) and caught.value.errno == 28
        assert leftovers(ckpt) == [] and ckpt.epochs() == [1]
        assert ckpt.load(1) == {"epoch": 1, "w": b"x" * 20_000}
        ckpt.save(3, {"epoch": 3})  # the space the failed write took is free again
        assert ckpt.epochs() == [1, 3]


def test_a_read_only_disk_names_the_file_whether_or_not_the_folder_exists(tmp_path):
    with tmpfs(tmp_path / "disk") as disk:
        ckpt = JobCheckpoints(disk, JOB, rank=0)
        ckpt.save(1, {"epoch": 1})
        remount_read_only(disk)
        with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint .*/epoch-00002\.rank-0\.pt: "
                                                       r"\[Errno 30\] Read-only file system"):
            ckpt.save(2, {"epoch": 2})
        assert leftovers(ckpt) == [] and ckpt.epochs() == [1] and ckpt.load(1) == {"epoch": 1}
        ckpt.remove()  # cannot delete on a read-only disk, and says nothing: the coordinator's clean-up retries

        other = JobCheckpoints(disk, "fedcba9876543210", rank=0)  # its folder cannot be created
        with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint "
                           rf"{disk}/fedcba9876543210/epoch-00001\.rank-0\.pt: \[Errno 30\] Read-only file system"):
            other.save(1, {"epoch": 1})
        assert other.epochs() == []


def fill(directory: Path) -> Path:
    """Write a file into `directory` until its file system is full; returns the file."""
    filler = directory / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


TIMINGS = {"train_s", "epoch_s"}


def comparable(result: JobResult) -> JobResult:
    return replace(result, final={k: v for k, v in result.final.items() if k not in TIMINGS},
                   epochs=[{k: v for k, v in e.items() if k not in TIMINGS} for e in result.epochs])


def test_a_pack_trains_on_through_a_full_disk_says_so_and_says_when_it_writes_again(tmp_path):
    """Epoch 1 is written; the disk is then filled, so epoch 2's checkpoint fails; after epoch 2 it is emptied, so
    epoch 3's is written. The members end exactly as twins that never checkpointed."""
    members = [Member(f"{k:016x}", config(epochs=5, seed=k, model={"hidden_sizes": [32]},
                                               regularizers=[{"name": "dropout", "p": 0.1}]))
               for k in (1, 2)]
    twin = run_pack(members, synthetic_splits(), registry(), device=torch.device("cpu")).results
    with tmpfs(tmp_path / "disk", size="8m") as disk:
        notes, written = [], []
        ckpt = JobCheckpoints(disk, pack_id([m.job_id for m in members]), rank=0)
        filler = []

        def on_epoch(job_id, epoch, metrics):
            if job_id != members[0].job_id:
                return
            written.append(ckpt.epochs())
            if epoch == 1:
                filler.append(fill(disk))
            if epoch == 2:
                filler.pop().unlink()

        run = run_pack(members, synthetic_splits(), registry(), device=torch.device("cpu"), checkpoint_dir=str(disk),
                       on_epoch=on_epoch, on_note=lambda ids, text: notes.append((ids, text)))
        assert written[:4] == [[1], [1], [1, 3], [3, 4]], notes  # epoch 5, the last, is never checkpointed
        assert not ckpt.dir.exists()  # removed when the pack ended
    ids = [m.job_id for m in members]
    path = disk / ckpt.dir.name
    assert notes == [
        (ids, f"checkpoint of epoch 2 not written (cannot write checkpoint {path}/epoch-00002.rank-0.pt: [Errno 28] No "
              "space left on device); training goes on without checkpoints, trying again after every epoch"),
        (ids, f"checkpoints written again from epoch 3 ({path}/epoch-00003.rank-0.pt)")]
    for m in members:
        assert comparable(run.results[m.job_id]) == comparable(twin[m.job_id])


class _Offered:
    """A rank's checkpoints as _resume sees them: the epochs it has (load is never the point here)."""

    def __init__(self, epochs):
        self._epochs = epochs

    def epochs(self):
        return self._epochs

    def load(self, epoch):
        return {"epoch": epoch}


class _Loads:
    def load_state_dict(self, state):
        self.loaded = state["epoch"]


def _rank_main(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        member = Member("00000000000000aa", config(epochs=5, model={"hidden_sizes": [16]}))
        disks = [Path(out) / "disk0", Path(out) / "disk1"]  # rank 1's is the tmpfs: its own storage
        seen, notes = [], []

        def on_epoch(job_id, epoch, metrics):  # rank 0, after every rank's write of `epoch`
            seen.append([JobCheckpoints(d, member.job_id, r).epochs() for r, d in enumerate(disks)])
            if epoch in (1, 2):  # rank 1 cannot write epoch 2's checkpoint; epoch 3's again
                subprocess.run(["mount", "-o", "remount," + ("ro" if epoch == 1 else "rw"), str(disks[1])], check=True)

        run = run_pack([member], synthetic_splits(), registry(), device=torch.device("cpu"),
                       checkpoint_dir=str(disks[rank]), rank=rank, world=world, on_epoch=on_epoch,
                       on_note=lambda ids, text: notes.append([ids, text]))
        offers = {0: ([2, 4], [3, 4], [], [1, 2]), 1: ([2, 3], [1, 2], [1], [1, 3])}[rank]
        resumed = [_resume(_Loads(), _Offered(epochs), torch.device("cpu"), world) for epochs in offers]
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "seen": seen, "notes": notes, "resumed": resumed,
            "final": {k: v for k, v in run.results[member.job_id].final.items() if k != "train_s"}}))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as in test_ddp: no interpreter teardown racing gloo's threads


def test_a_rank_that_cannot_write_says_so_and_no_rank_keeps_that_epoch(tmp_path):
    """Two gloo ranks, each writing to its own storage; rank 1's goes read-only for epoch 2. Rank 1 notes it and
    the recovery; rank 0 drops its own epoch-2 file, so both keep exactly the epochs both have. A retried attempt
    resumes from the newest epoch every rank has."""
    (tmp_path / "disk0").mkdir()
    with tmpfs(tmp_path / "disk1", size="4m") as disk:
        mp.spawn(_rank_main, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["seen"][:4] == [[[1], [1]], [[1], [1]], [[1, 3], [1, 3]], [[3, 4], [3, 4]]]
    path = disk / "00000000000000aa"
    assert ranks[0]["notes"] == []
    assert ranks[1]["notes"] == [
        [["00000000000000aa"], f"checkpoint of epoch 2 not written (cannot write checkpoint {path}/epoch-00002.rank-1"
                               ".pt: [Errno 30] Read-only file system); training goes on without checkpoints, trying "
                               "again after every epoch"],
        [["00000000000000aa"], f"checkpoints written again from epoch 3 ({path}/epoch-00003.rank-1.pt)"]]
    assert ranks[0]["resumed"] == ranks[1]["resumed"] == [2, 0, 0, 1]
    assert ranks[0]["final"] == ranks[1]["final"]


def test_the_error_survives_pickling_across_processes():
    import pickle

    error = CheckpointWriteError(28, "No space left on device", "/c/x/epoch-00002.rank-0.pt")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is CheckpointWriteError and str(again) == str(error) and again.errno == 28


def test_a_note_changes_no_state_and_status_shows_the_latest_of_the_current_attempt(tmp_path):
    from l2cluster.results.store import Store, experiment_jobs, job_log
    from l2cluster.spec import expand, parse_spec
    from l2cluster.states import JobState

    spec = {"name": "n", "optimizer": {"name": "adam"}, "epochs": 1, "sweep": {"seeds": [0, 1]}}
    jobs = expand(parse_spec(spec, registry()), registry())
    store = Store(tmp_path / "store.db")
    store.add_experiment("n-1", "n", spec, jobs)
    a, b = jobs[0].id, jobs[1].id
    for state in (JobState.PLACING, JobState.RUNNING):
        store.transition(a, state)
    assert store.add_note(a, "first", attempt=1) and store.add_note(a, "second", attempt=1)
    assert not store.add_note(a, "from an attempt that is over", attempt=0)
    assert store.job(a)["state"] == "running"
    shown = {j["job"]: j.get("note") for j in experiment_jobs(store, "n")}
    assert shown == {a: "second", b: None}
    assert [(e["from"], e["to"], e["detail"]) for e in job_log(store, a)["events"]][-2:] == [
        ("running", "running", "first"), ("running", "running", "second")]
    store.transition(a, JobState.QUEUED, detail="attempt 1 lost")  # the next attempt starts without a note
    store.transition(a, JobState.PLACING)
    assert "note" not in experiment_jobs(store, "n")[0]
    store.close()


# A small real job on the daemon: its checkpoints (about 300 kB) do not fit a 64 kB disk.
DAEMON_JOB = {"model": {"hidden_sizes": [32]}, "data": {"batch_size": 50, "val_size": 500, "train_size": 1000},
              "optimizer": {"name": "adam", "lr": 0.003}, "regularizers": [{"name": "dropout", "p": 0.1}], "epochs": 3}


@pytest.mark.slow
def test_a_daemon_job_on_a_full_checkpoint_disk_succeeds_as_its_twin_and_says_why(tmp_path, mnist_dir, capsys):
    import ray

    from l2cluster.cli import main
    from l2cluster.results.store import Store

    def run(handle, name):
        exp = ray.get(handle.submit.remote({"name": name, **DAEMON_JOB}), timeout=60)["experiment"]

        def ended():
            jobs = ray.get(handle.status.remote(exp), timeout=30)
            return jobs if all(j["state"] in ("succeeded", "failed") for j in jobs) else None

        return exp, wait_for(ended, f"experiment {name} to end", timeout_s=240)[0]

    store_path = tmp_path / "store.db"
    disk = tmp_path / "checkpoints"
    with tmpfs(disk, size="16m"), local_daemon(store_path, num_cpus=2, data_dir=str(mnist_dir),
                                               checkpoint_dir=str(disk)) as cluster:
        _, twin = run(cluster["handle"], "disk-twin")  # healthy disk: checkpoints written, nothing to say
        subprocess.run(["mount", "-o", "remount,size=64k", str(disk)], check=True)
        exp, job = run(cluster["handle"], "disk-full")
        log = ray.get(cluster["handle"].logs.remote(job["job"]), timeout=30)

    store = Store.open_read_only(store_path)
    try:
        assert twin["state"] == job["state"] == "succeeded" and job["attempts"] == 1
        assert "note" not in twin
        outcome = [{k: v for k, v in store.result(j)["final"].items() if k not in TIMINGS} for j in (job["job"],
                                                                                                      twin["job"])]
        assert outcome[0] == outcome[1]
    finally:
        store.close()
    expected = (f"checkpoint of epoch 1 not written (cannot write checkpoint {disk}/{job['job']}/epoch-00001.rank-0.pt:"
                " [Errno 28] No space left on device); training goes on without checkpoints, trying again after every "
                "epoch")
    assert job["note"] == expected  # `status` on the daemon
    assert [e["detail"] for e in log["events"] if e["from"] == e["to"]] == [expected]  # `logs` on the daemon
    capsys.readouterr()
    assert main(["status", exp, "--store", str(store_path)]) == 0
    assert f"note: job {job['job'][:8]}: {expected}" in capsys.readouterr().out
    assert main(["logs", job["job"], "--store", str(store_path)]) == 0
    assert f"     note   running   attempt 1  {expected}" in capsys.readouterr().out
