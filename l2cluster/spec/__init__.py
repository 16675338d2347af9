"""Job specs, as one import: the names of the modules a spec passes through, re-exported.

An experiment spec is a training config (model, data, optimizer, schedule, epochs, seed, regularizers, scaling)
plus a name and a `sweep`. Each stage has its own module:

- `l2cluster.spec.config`: the pydantic models (the static `TrainConfig`, the registry's models: `spec_models`);
- `l2cluster.spec.errors`: `SpecError` and its `Issue`s (field path + how to fix it);
- `l2cluster.spec.loading`: a YAML/JSON file into plain data, plain data into a validated spec;
- `l2cluster.spec.sweep`: a spec into its jobs;
- `l2cluster.ids`: the ids of experiments, jobs, their seed groups and packs.
"""

from __future__ import annotations

from l2cluster.ids import NOT_IN_JOB_ID, experiment_id, identity
from l2cluster.ids import job_id as job_digest
from l2cluster.limits import DEFAULT_MAX_JOBS
from l2cluster.spec.config import (
    MAX_SEED,
    NAME_RE,
    NUM_CLASSES,
    NUM_PIXELS,
    AdamConfig,
    AdamWConfig,
    ConstantSchedule,
    CosineSchedule,
    DataConfig,
    GridValues,
    ModelConfig,
    OptimizerConfig,
    PlateauSchedule,
    ScalingConfig,
    ScheduleConfig,
    Seed,
    SGDConfig,
    SpecModels,
    StepSchedule,
    SweepConfig,
    TrainConfig,
    Variant,
    safe_component,
    spec_models,
)
from l2cluster.spec.errors import Issue, SpecError, issues_from, plugin_problems, union_tags
from l2cluster.spec.loading import (
    MAX_DEPTH,
    MAX_SPEC_BYTES,
    MAX_VALUES,
    _SpecLoader,  # noqa: F401 (tests read the loader here)
    bools_as_numbers,
    load_spec,
    parse_spec,
    read_spec_file,
    structure_issues,
)
from l2cluster.spec.sweep import Job, PathError, count_jobs, expand, plugin_versions, set_path

__all__ = [
    "DEFAULT_MAX_JOBS", "MAX_DEPTH", "MAX_SEED", "MAX_SPEC_BYTES", "MAX_VALUES", "NAME_RE", "NOT_IN_JOB_ID",
    "NUM_CLASSES", "NUM_PIXELS", "AdamConfig", "AdamWConfig", "ConstantSchedule", "CosineSchedule", "DataConfig",
    "GridValues", "Issue", "Job", "ModelConfig", "OptimizerConfig", "PathError", "PlateauSchedule", "SGDConfig",
    "ScalingConfig", "ScheduleConfig", "Seed", "SpecError", "SpecModels", "StepSchedule", "SweepConfig",
    "TrainConfig", "Variant", "bools_as_numbers", "count_jobs", "expand", "experiment_id",
    "identity", "issues_from", "job_digest", "load_spec", "parse_spec", "plugin_problems", "plugin_versions",
    "read_spec_file", "safe_component", "set_path", "spec_models", "structure_issues", "union_tags",
]
