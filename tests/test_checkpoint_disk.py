"""Checkpoint writes the OS refuses, on real small file systems (a tmpfs mounted for the test; skipped where this
process may not mount): the error names the file and the OS error, no partial file is left, the earlier checkpoint
is intact, and a job whose checkpoints cannot be written trains on to the same result, saying so."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from l2cluster.checkpoint import CheckpointWriteError, JobCheckpoints

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


def test_the_error_survives_pickling_across_processes():
    import pickle

    error = CheckpointWriteError(28, "No space left on device", "/c/x/epoch-00002.rank-0.pt")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is CheckpointWriteError and str(again) == str(error) and again.errno == 28
