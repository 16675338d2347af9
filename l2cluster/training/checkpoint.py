"""Checkpoint files of running jobs: one file per job, rank and epoch, written atomically, the newest kept.

Layout: `<checkpoint_dir>/<job_id>/epoch-<E>.rank-<R>.pt`, each a `Trainer.state_dict()` of that rank (ranks differ
in their dropout streams). A file appears whole or not at all (written to a temporary name, then renamed), so a
rank killed mid-write leaves the previous checkpoint intact. A write that the OS refuses (disk full, I/O error,
read-only file system) raises CheckpointWriteError naming the file and the OS error, and leaves nothing behind.
Plain torch: the gang calls it, the trainer never does.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path

import torch

from l2cluster.errors import L2ClusterError

_NAME = re.compile(r"^epoch-(\d+)\.rank-(\d+)\.pt$")


class CheckpointWriteError(L2ClusterError, OSError):
    """A checkpoint file could not be written: the OS error (errno, strerror) and the file it was for.

    An OSError with the same errno, so `except OSError` and `e.errno == errno.ENOSPC` work; it pickles with its
    fields (OSError's own pickling keeps errno, strerror and filename)."""

    def __str__(self) -> str:
        return f"cannot write checkpoint {self.filename}: [Errno {self.errno}] {self.strerror}"


class JobCheckpoints:
    """One rank's checkpoints of one job."""

    def __init__(self, root: str | Path, job_id: str, rank: int, keep: int = 2):
        if not re.fullmatch(r"[0-9a-f]{8,64}", job_id):  # job ids are hex digests: a safe path component
            raise ValueError(f"not a job id: {job_id!r}")
        self.dir = Path(root) / job_id
        self.rank, self.keep = rank, keep

    def _path(self, epoch: int) -> Path:
        return self.dir / f"epoch-{epoch:05d}.rank-{self.rank}.pt"

    def epochs(self) -> list[int]:
        """The epochs this rank has a complete checkpoint of, oldest first."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        found = (_NAME.match(n) for n in names)
        return sorted(int(m[1]) for m in found if m and int(m[2]) == self.rank)

    def save(self, epoch: int, state: dict) -> Path:
        """Write this rank's state after `epoch`, then drop all but the newest `keep` checkpoints.

        Raises CheckpointWriteError when the OS refuses the folder or the file; the earlier checkpoints are then
        untouched and no partial file is left."""
        # Serialized in memory first: torch.save straight to a file turns ENOSPC into an opaque RuntimeError from
        # its zip writer ("unexpected pos …"); plain writes give the OS error.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path = self._path(epoch)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it the newest checkpoint
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise CheckpointWriteError(e.errno, e.strerror or str(e), str(path)) from e
        with contextlib.suppress(OSError):  # an old file left behind is harmless: the job's folder goes at its end
            for old in self.epochs()[:-self.keep]:
                self._path(old).unlink(missing_ok=True)
        return path

    def discard(self, epoch: int) -> None:
        """Delete this rank's checkpoint of `epoch` (another rank failed to write its own: no resume can use it)."""
        self._path(epoch).unlink(missing_ok=True)

    def load(self, epoch: int) -> dict:
        # weights_only: a checkpoint is tensors, numbers, strings, lists and dicts; never unpickle code from disk.
        return torch.load(self._path(epoch), map_location="cpu", weights_only=True)

    def remove(self) -> None:
        """Delete this rank's files; the job's folder goes with the last rank's. Never raises: a file the OS will not
        delete (a read-only or failing disk) is left for the coordinator's clean-up (remove_job)."""
        with contextlib.suppress(OSError):
            for epoch in self.epochs():
                self._path(epoch).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other ranks' files (or their temporary files) are still there
            self.dir.rmdir()


def remove_job(root: str | Path, job_id: str) -> None:
    """Delete a finished job's checkpoints of every rank (the coordinator's clean-up)."""
    if re.fullmatch(r"[0-9a-f]{8,64}", job_id):
        shutil.rmtree(Path(root) / job_id, ignore_errors=True)
