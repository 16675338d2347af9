"""Checkpoint files of running jobs: one file per job, rank and epoch, written atomically, the newest kept.

Layout: `<checkpoint_dir>/<job_id>/epoch-<E>.rank-<R>.pt`, each a `Trainer.state_dict()` of that rank (ranks differ
in their dropout streams). A file appears whole or not at all (written to a temporary name, then renamed), so a
rank killed mid-write leaves the previous checkpoint intact. Plain torch: the gang calls it, the trainer never does.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import torch

_NAME = re.compile(r"^epoch-(\d+)\.rank-(\d+)\.pt$")


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
        """Write this rank's state after `epoch`, then drop all but the newest `keep` checkpoints."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(epoch)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in self.epochs()[:-self.keep]:
            self._path(old).unlink(missing_ok=True)
        return path

    def load(self, epoch: int) -> dict:
        # weights_only: a checkpoint is tensors, numbers, strings, lists and dicts; never unpickle code from disk.
        return torch.load(self._path(epoch), map_location="cpu", weights_only=True)

    def remove(self) -> None:
        """Delete this rank's files; the job's folder goes with the last rank's."""
        for epoch in self.epochs():
            self._path(epoch).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other ranks' files (or their temporary files) are still there
            self.dir.rmdir()


def remove_job(root: str | Path, job_id: str) -> None:
    """Delete a finished job's checkpoints of every rank (the coordinator's clean-up)."""
    if re.fullmatch(r"[0-9a-f]{8,64}", job_id):
        shutil.rmtree(Path(root) / job_id, ignore_errors=True)
