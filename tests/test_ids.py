"""Ids are pinned: job, group, experiment and pack ids computed by the code that handed out the ids of existing
stores. A change to how any of them is derived (a field added to the identity, another JSON encoding) fails here
before it orphans the results of every store."""

from __future__ import annotations

from support import registry

from l2cluster.ids import experiment_id, job_id, pack_id
from l2cluster.packing import stack_key
from l2cluster.spec.loading import parse_spec
from l2cluster.spec.sweep import expand

SPEC = {"name": "pinned", "epochs": 2, "model": {"hidden_sizes": [32]}, "optimizer": {"name": "adamw", "lr": 0.001},
        "sweep": {"seeds": [0, 1], "grid": {"optimizer.lr": [0.001, 0.01]}}}
# (job id, group key, seed) of SPEC's jobs in order, as the code before l2cluster.ids computed them.
PINNED_JOBS = [("8e63d0817437fa34", "a49e6a52a0b3b08e", 0), ("44148a4d23e72caf", "a49e6a52a0b3b08e", 1),
               ("a74b2f58241a6fac", "8105b6c19a72e5d1", 0), ("65799d1f002e67f6", "8105b6c19a72e5d1", 1)]


def test_job_group_and_experiment_ids_are_unchanged():
    spec = parse_spec(SPEC, registry())
    jobs = expand(spec, registry())
    assert [(j.id, j.group, j.seed) for j in jobs] == PINNED_JOBS
    assert experiment_id(spec, jobs) == "pinned-8ed75f1d"


def test_a_job_id_with_and_without_plugin_versions_is_unchanged():
    assert job_id("exp", {"a": 1, "b": [1.5, "x"]}, {}) == "50e461dae1db4ab0"
    assert job_id("exp", {"a": 1}, {"l2": "sha256:0123456789abcdef"}) == "8c8683c0cde107d9"


def test_pack_ids_and_stack_keys_are_unchanged():
    ids = [job_id for job_id, _, _ in PINNED_JOBS]
    assert pack_id(ids) == "ae138e38329ba406"
    assert pack_id(ids[:1]) == ids[0]  # a pack of one is its job: its checkpoints stay where they were
    (job, *_) = expand(parse_spec(SPEC, registry()), registry())
    assert stack_key(job.config.model_dump(mode="json")) == "a71a2044fd4fec98"
