"""Checkpoint files: a real trainer's state survives a save/load (no code is unpickled), only the newest are
kept, a half-written file is never taken for a checkpoint, and job ids are the only path components."""

from __future__ import annotations

import pytest
import torch
from support import config, params_of, registry, synthetic_splits

from l2cluster.training.checkpoint import JobCheckpoints, remove_job
from l2cluster.training.trainer import Trainer

JOB = "0123456789abcdef"


def test_a_saved_trainer_state_resumes_exactly(tmp_path):
    cfg = config(epochs=3, regularizers=[{"name": "dropout", "p": 0.2}], schedule={"name": "cosine"})
    full = Trainer([cfg], synthetic_splits(), registry(), device="cpu")
    full_result = full.fit()[0]

    ckpt = JobCheckpoints(tmp_path, JOB, rank=0)
    first = Trainer([cfg], synthetic_splits(), registry(), device="cpu")
    first.fit(on_epoch=lambda epoch, m: ckpt.save(epoch, first.state_dict()) if epoch == 1 else None)
    resumed = Trainer([cfg], synthetic_splits(), registry(), device="cpu")
    resumed.load_state_dict(ckpt.load(1))  # torch.load(weights_only=True) accepts the whole state
    result = resumed.fit()[0]
    for name, p in params_of(full).items():
        assert torch.equal(p, params_of(resumed)[name]), name
    assert {k: v for k, v in result.final.items() if k != "train_s"} == \
           {k: v for k, v in full_result.final.items() if k != "train_s"}


def test_only_the_newest_checkpoints_are_kept_and_remove_clears_the_job(tmp_path):
    ranks = [JobCheckpoints(tmp_path, JOB, rank=r, keep=2) for r in (0, 1)]
    for epoch in range(1, 6):
        for c in ranks:
            c.save(epoch, {"epoch": epoch})
    assert ranks[0].epochs() == ranks[1].epochs() == [4, 5]
    assert ranks[0].load(5) == {"epoch": 5}
    (ranks[0].dir / ".epoch-00006.rank-0.pt.123.tmp").write_bytes(b"half")  # a rank killed mid-write
    assert ranks[0].epochs() == [4, 5]
    ranks[0].remove()
    assert ranks[0].epochs() == [] and ranks[1].epochs() == [4, 5] and ranks[0].dir.exists()
    remove_job(tmp_path, JOB)
    assert not ranks[0].dir.exists()


def test_job_ids_are_the_only_path_components(tmp_path):
    for bad in ("../../etc", "a/b", "", "ABCDEF0123456789"):
        with pytest.raises(ValueError, match="not a job id"):
            JobCheckpoints(tmp_path, bad, rank=0)
    remove_job(tmp_path, "..")  # ignored, never a path outside the checkpoint directory
    assert tmp_path.exists()
