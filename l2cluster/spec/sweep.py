"""Sweep expansion: an ExperimentSpec into its jobs — (union of variants) × (product of grids) × seeds — each
validated, with a stable id (l2cluster.ids: a hash of the experiment's name, the job's resolved config, seed
included, and the code versions of the plugins it uses), so resubmitting the same spec with the same plugin code
gives the same ids.
"""

from __future__ import annotations

import copy
import itertools
import math
import reprlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from l2cluster import ids
from l2cluster.errors import InputError
from l2cluster.limits import DEFAULT_MAX_JOBS
from l2cluster.spec.config import TrainConfig, Variant, spec_models
from l2cluster.spec.errors import Issue, SpecError, issues_from, plugin_problems, union_tags
from l2cluster.spec.loading import bools_as_numbers

if TYPE_CHECKING:
    from l2cluster.registry import Registry  # only a type here: reading a spec loads no plugin code


@dataclass(frozen=True)
class Job:
    """One concrete training run of an experiment."""

    id: str
    experiment: str
    label: str
    overrides: dict[str, Any]
    seed: int
    config: TrainConfig
    plugins: dict[str, str] = field(default_factory=dict)
    """The code version of each plugin the job uses, by name (l2cluster.registry.PluginInfo.version)."""

    @property
    def group(self) -> str:
        """Hash of the config and plugin versions without the seed: the jobs that differ only by seed share it."""
        return ids.group_key(self.experiment, self.config, self.plugins)


def plugin_versions(config: TrainConfig, registry: Registry) -> dict[str, str]:
    """The code version of each plugin a resolved config uses."""
    return {r.name: registry.get(r.name).version for r in config.regularizers}


class PathError(InputError, ValueError):
    pass


_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 60, 60, 6, 6, 3


def set_path(cfg: dict, path: str, value: Any) -> None:
    """Set a dotted path in a resolved config dict. List items are addressed by index or, for regularizers,
    by plugin name (`regularizers.l2.strength`)."""
    parts = path.split(".")
    if parts[0] in ("seed",):
        raise PathError("the seed is swept with sweep.seeds, not the grid")
    if parts[0] in ("name", "description", "sweep"):
        raise PathError(f"{parts[0]!r} cannot be swept; sweep paths point into the training config")
    node: Any = cfg
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[:i]) or "the spec"
        if isinstance(node, list):
            if part.isascii() and part.isdigit():
                idx = int(part)
                if idx >= len(node):
                    raise PathError(f"{where} has {len(node)} entries; index {idx} is out of range")
            else:
                matches = [j for j, item in enumerate(node) if isinstance(item, dict) and item.get("name") == part]
                if not matches:
                    names = [item.get("name") for item in node if isinstance(item, dict)]
                    raise PathError(
                        f"{where} has no entry named {part!r} (it has {names or 'none'}); add "
                        f"{{name: {part}}} to {where} (or to the variant's `set`) before sweeping it"
                    )
                idx = matches[0]
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value  # unknown fields are refused when the resolved config is validated
            elif part not in node:
                raise PathError(f"{where} has no field {part!r}; fields: {', '.join(node)}")
            else:
                node = node[part]
        else:
            raise PathError(f"{where} is a value, not a section; {path!r} goes too deep")


def count_jobs(spec) -> int:
    seeds = len(spec.sweep.seeds or [spec.seed])
    variants = spec.sweep.variants or [Variant(label="base")]
    total = 0
    for v in variants:
        grid = {**spec.sweep.grid, **v.grid}
        total += math.prod(len(vals) for vals in grid.values())
    return total * seeds


def expand(spec, registry: Registry, *, max_jobs: int = DEFAULT_MAX_JOBS) -> list[Job]:
    """Expand an ExperimentSpec into its jobs, each validated; SpecError names the sweep entry at fault."""
    n = count_jobs(spec)
    if n > max_jobs:
        raise SpecError(spec.name, [Issue(
            "sweep", f"expands to {n} jobs, more than the limit of {max_jobs}; shrink the grid or seeds, "
            "or raise the limit (--max-jobs)")])
    train_model = spec_models(registry).train
    base = spec.model_dump(mode="json", exclude={"name", "description", "sweep"})
    seeds = spec.sweep.seeds or [spec.seed]
    variants: list[tuple[int | None, Variant]] = [*enumerate(spec.sweep.variants)] or [(None, Variant(label="base"))]
    jobs: list[Job] = []
    seen: set[str] = set()
    for vi, variant in variants:
        where = f"sweep.variants[{vi}]" if vi is not None else "sweep"
        cfg0 = copy.deepcopy(base)
        for path, value in variant.set.items():
            try:
                set_path(cfg0, path, copy.deepcopy(value))
            except PathError as e:
                raise SpecError(spec.name, [Issue(f"{where}.set.{path}", str(e))]) from None
        grid = {**spec.sweep.grid, **variant.grid}
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            overrides = dict(zip(keys, combo))
            cfg = copy.deepcopy(cfg0)
            for path, value in overrides.items():
                try:
                    set_path(cfg, path, copy.deepcopy(value))
                except PathError as e:
                    section = "sweep.grid" if path in spec.sweep.grid else f"{where}.grid"
                    raise SpecError(spec.name, [Issue(f"{section}.{path}", str(e))]) from None
            for seed in seeds:
                cfg["seed"] = seed
                try:
                    config = train_model.model_validate(cfg)
                    issues = bools_as_numbers(config, cfg)
                except ValidationError as e:
                    issues = issues_from(e, union_tags(registry), problems=plugin_problems(registry))
                if issues:
                    setting = ", ".join(f"{k}={_short.repr(v)}" for k, v in overrides.items()) or "no grid values"
                    raise SpecError(spec.name, [Issue(i.path, f"{i.message} (in {where} with {setting})")
                                                for i in issues])
                plugins = plugin_versions(config, registry)
                job_id = ids.job_id(spec.name, ids.identity(config), plugins)
                if job_id in seen:
                    continue  # two grid points that resolve to the same config run once
                seen.add(job_id)
                label = variant.label if vi is not None else ""
                jobs.append(Job(job_id, spec.name, label, overrides, seed, config, plugins))
    return jobs

