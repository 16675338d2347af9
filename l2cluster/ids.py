"""Every id l2cluster derives — of a job, its seed group, an experiment and a pack — and what each one hashes.

Ids are stable: resubmitting the same spec with the same plugin code names the same experiment and jobs, so a
store reuses their results. Existing stores hold these values: a change to what is hashed, or how (the JSON
encoding, the digest's length), gives every stored job a new id; tests/test_ids.py pins them.

Plain Python (no torch, no Ray, no pydantic): a config or spec is anything with pydantic's `model_dump`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Protocol


class _Dumpable(Protocol):
    def model_dump(self, *, mode: str = ..., exclude: Any = ...) -> dict[str, Any]: ...


class _Spec(_Dumpable, Protocol):
    @property
    def name(self) -> str: ...


class _HasPlugins(Protocol):
    @property
    def plugins(self) -> dict[str, str]: ...


# Settings of how the daemon runs a job, not of what it computes: changing them keeps the job's identity.
NOT_IN_JOB_ID: dict[str, Any] = {"max_attempts": True, "scaling": {"pack"}}

# Fields added after job ids were first handed out, with the value every earlier job had: left out of a job's
# identity while they keep that value, so the jobs of an existing store keep their ids (and stored results).
_ADDED_LATER = {("model", "tf32"): False}


def identity(config: _Dumpable) -> dict:
    """What a job's id hashes (with its experiment's name): the resolved config (a TrainConfig) without how it is
    run."""
    cfg = config.model_dump(mode="json", exclude=NOT_IN_JOB_ID)
    for (section, name), default in _ADDED_LATER.items():
        if cfg.get(section, {}).get(name) == default:
            del cfg[section][name]
    return cfg


def job_id(experiment: str, cfg: dict, plugins: dict[str, str]) -> str:
    """A job's id (or, without the seed in `cfg`, its group): the experiment's name, the job's identity and the
    versions of its plugins' code, so that changed plugin code never reuses a stored result. A job without
    plugins hashes what it did before versions were part of ids, and keeps its id."""
    obj: dict[str, Any] = {"experiment": experiment, "config": cfg}
    if plugins:
        obj["plugins"] = plugins
    return _digest(obj)


def group_key(experiment: str, config: _Dumpable, plugins: dict[str, str]) -> str:
    """The key of a job's seed group: the jobs of an experiment that differ only by seed share it."""
    cfg = identity(config)
    cfg.pop("seed")
    return job_id(experiment, cfg, plugins)


def experiment_id(spec: _Spec, jobs: Sequence[_HasPlugins]) -> str:
    """`<name>-<8 hex>`: the spec as validated and the plugin versions its jobs use. Resubmitting the same spec
    with the same plugin code names the same experiment; changed plugin code (new job ids) a new one."""
    obj: Any = spec.model_dump(mode="json")
    plugins = {name: v for job in jobs for name, v in job.plugins.items()}
    if plugins:
        obj = {"spec": obj, "plugins": plugins}
    return f"{spec.name}-{hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]}"


def pack_id(job_ids: Sequence[str]) -> str:
    """A pack's id: a one-member pack is its job (checkpoints stay where they always were); a larger one is a
    digest of its members, in order (hex, so it is a safe directory name like a job id)."""
    if len(job_ids) == 1:
        return job_ids[0]
    return hashlib.sha256("\n".join(job_ids).encode()).hexdigest()[:16]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
