"""Job specs: the pydantic models of an experiment, loading them from YAML/JSON, and sweep expansion into jobs.

An experiment spec is a training config (model, data, optimizer, schedule, epochs, seed, regularizers, scaling)
plus a name and a `sweep`. Expansion turns it into concrete jobs: the union of its variants, each the product
of its grid, times the seeds. Each job gets a stable id, a hash of the experiment name, its resolved config
(seed included) and the code versions of the plugins it uses, so resubmitting the same spec with the same plugin
code gives the same ids.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from l2cluster.limits import DEFAULT_MAX_JOBS  # noqa: F401 (spec.DEFAULT_MAX_JOBS, as before)
from l2cluster.registry import Registry

NUM_PIXELS, NUM_CLASSES = 784, 10
MAX_SEED = 2**63 - 1  # the store keeps seeds in SQLite INTEGER columns (signed 64-bit)

# Experiment names and anything else that becomes a file or directory name: one safe path component.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SWEEP_PATH_RE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def safe_component(text: str) -> str:
    """Return `text` unchanged if it is safe as one file or directory name, else raise ValueError.

    Safe: 1–128 ASCII letters, digits, '.', '_' and '-', not starting with '.' or '-' — so never '', '.', '..',
    a hidden file, an option-like name, or anything with a separator. Experiment names, experiment ids
    (name-digest) and job ids (hex) always pass. It never rewrites the text: two different names can never end
    up in the same directory."""
    if not isinstance(text, str) or not _COMPONENT_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a safe path component: use 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return text


def _check_name(v: str) -> str:
    if not NAME_RE.fullmatch(v):
        raise ValueError(f"{v[:80]!r} is not a valid experiment name: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit (it becomes part of job ids and directory names)")
    return v


Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def _non_empty(values: list[Any]) -> list[Any]:
    if not values:
        raise ValueError("has no values; give at least one or remove this entry")
    return values


GridValues = Annotated[list[Any], AfterValidator(_non_empty)]


def _check_sweep_paths(grid: dict[str, Any]) -> dict[str, Any]:
    for path in grid:
        if not _SWEEP_PATH_RE.fullmatch(path):
            raise ValueError(f"{path[:80]!r} is not a dotted path such as optimizer.lr or regularizers.l2.strength "
                             "(names and list indexes joined by single dots)")
    return grid


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    """The MLP: 784 inputs, the hidden layers below, 10 outputs."""

    hidden_sizes: list[Annotated[int, Field(ge=1, le=65536)]] = Field([512, 256, 128], min_length=1, max_length=16)
    """Widths of the hidden layers (the reference is 784-512-256-128-10)."""
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    """Nonlinearity after every hidden layer."""
    dtype: Literal["float32", "float64"] = "float32"
    """Parameter and compute dtype; float64 is for exactness tests."""
    tf32: bool = False
    """float32 matmuls on Ampere and newer GPUs use TF32 tensor cores: faster, ~1e-3 relative error. No effect
    on the CPU or in float64. Part of the job's identity (it changes the numbers)."""


class DataConfig(_Strict):
    """How MNIST is split and batched."""

    batch_size: int = Field(64, ge=1, le=60000)
    """Global batch size: one optimizer step sees this many examples, split across the DDP ranks."""
    val_size: int = Field(5000, ge=1, le=59999)
    """Examples held out of the 60k training images for validation (LR decisions, model selection)."""
    train_size: int | None = Field(None, ge=1, le=59999)
    """Use only this many of the remaining training examples (quick runs); default: all of them."""
    split_seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed of the validation split: the same for every job of a sweep, so all are judged on the same data."""


class _Optimizer(_Strict):
    lr: float = Field(1e-3, gt=0, le=10)
    """Learning rate (before the schedule)."""
    weight_decay: float = Field(0.0, ge=0, le=10)
    """The optimizer's own weight decay; 0 unless set here (AdamW's library default of 1e-2 never applies)."""


class SGDConfig(_Optimizer):
    """torch.optim.SGD."""

    name: Literal["sgd"]
    lr: float = Field(0.01, gt=0, le=10)
    """Learning rate (before the schedule)."""
    momentum: float = Field(0.0, ge=0, lt=1)
    """Momentum factor."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0)."""

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self):
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: true needs momentum > 0; set optimizer.momentum (e.g. 0.9)")
        return self


class AdamConfig(_Optimizer):
    """torch.optim.Adam; its weight_decay is an L2 term folded into the gradient (coupled)."""

    name: Literal["adam"]
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    """Decay rates of the first and second moment estimates."""
    eps: float = Field(1e-8, gt=0)
    """Added to the denominator for numerical stability."""


class AdamWConfig(AdamConfig):
    """torch.optim.AdamW; its weight_decay is decoupled (Loshchilov & Hutter) and defaults to 0 here."""

    # type-check: pydantic's typing of models built at run time
    name: Literal["adamw"]  # type: ignore[assignment]


class ConstantSchedule(_Strict):
    """The learning rate stays at optimizer.lr."""

    name: Literal["constant"] = "constant"


class StepSchedule(_Strict):
    """Multiply the learning rate by gamma every step_size epochs."""

    name: Literal["step"]
    step_size: int = Field(ge=1)
    """Epochs between decays."""
    gamma: float = Field(0.1, gt=0, le=1)
    """Decay factor."""


class CosineSchedule(_Strict):
    """Cosine annealing from optimizer.lr to min_lr over t_max epochs."""

    name: Literal["cosine"]
    t_max: int | None = Field(None, ge=1)
    """Epochs of one half cosine; default: the job's epochs."""
    min_lr: float = Field(0.0, ge=0)
    """Learning rate at the end of the cosine."""


class PlateauSchedule(_Strict):
    """Reduce the learning rate when the *validation* loss stops improving (never the test loss)."""

    name: Literal["plateau"]
    factor: float = Field(0.1, gt=0, lt=1)
    """Multiply the learning rate by this on a plateau."""
    patience: int = Field(2, ge=0)
    """Epochs without improvement before reducing."""
    threshold: float = Field(1e-4, ge=0)
    """Relative improvement in validation loss that counts as improvement."""
    min_lr: float = Field(0.0, ge=0)
    """Lower bound on the learning rate."""


OptimizerConfig = Annotated[SGDConfig | AdamConfig | AdamWConfig, Field(discriminator="name")]
ScheduleConfig = Annotated[
    ConstantSchedule | StepSchedule | CosineSchedule | PlateauSchedule, Field(discriminator="name")
]


class ScalingConfig(_Strict):
    """Where a job runs: DDP ranks and the resources each takes (used by the daemon)."""

    num_workers: int = Field(1, ge=1, le=1024)
    """DDP ranks of one job; each takes a shard of every global batch."""
    use_gpu: Literal["auto"] | bool = "auto"
    """true: needs a GPU; false: CPU only; "auto": a GPU when there is one."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPU cores reserved per rank (the worker's torch uses one thread per reserved core)."""
    gpus_per_worker: float = Field(1.0, gt=0)
    """GPUs reserved per rank when on GPU; fractions are allowed only for single-rank jobs (NCCL refuses two
    ranks on one GPU)."""
    pack: bool = True
    """Let the daemon train this job stacked with other queued jobs that differ from it only in seed and numeric
    regularizer settings (one pack, one set of kernels: the same results, much faster on a GPU). false: always
    train it alone."""

    @model_validator(mode="after")
    def _fractional_gpus(self):
        if self.gpus_per_worker < 1 and self.num_workers > 1:
            raise ValueError(
                f"gpus_per_worker={self.gpus_per_worker} with num_workers={self.num_workers}: NCCL refuses two "
                "ranks on one GPU; use gpus_per_worker: 1 or num_workers: 1"
            )
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError("gpus_per_worker above 1 must be a whole number")
        return self


class Variant(_Strict):
    """One branch of a sweep: settings applied to the base spec, then its own grid."""

    label: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")
    """Short name shown in results (e.g. "l2")."""
    set: Annotated[dict[str, Any], AfterValidator(_check_sweep_paths)] = {}
    """Dotted path → value, applied to the base spec (e.g. {regularizers: [{name: l2}]})."""
    grid: Annotated[dict[str, GridValues], AfterValidator(_check_sweep_paths)] = {}
    """Dotted path → values; the variant runs every combination (with the sweep's common grid)."""


class SweepConfig(_Strict):
    """Which jobs an experiment runs: (union of variants) × (product of grids) × seeds."""

    seeds: list[Seed] | None = Field(None, min_length=1, max_length=1000)
    """Seeds to run every configuration with; default: just the spec's `seed`."""
    grid: Annotated[dict[str, GridValues], AfterValidator(_check_sweep_paths)] = {}
    """Dotted path → values, e.g. {"optimizer.lr": [1e-3, 3e-3], "regularizers.l2.strength": [1e-4, 1e-3]}."""
    variants: list[Variant] = []
    """Alternatives to compare (e.g. one per regularizer); empty: the base spec is the only variant."""

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError("seeds must be distinct; remove the repeated ones")
        return v

    @field_validator("variants")
    @classmethod
    def _unique_labels(cls, v):
        labels = [variant.label for variant in v]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"variant labels must be distinct; {repeated} used more than once")
        return v


def _check_seed(v: int) -> int:
    if not 0 <= v <= MAX_SEED:
        raise ValueError(f"must be between 0 and {MAX_SEED} (2^63 - 1), got {v}")
    return v


def _check_train_config(cfg):
    names = [r.name for r in cfg.regularizers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"regularizers: {dupes} listed more than once; give each regularizer once")
    decay_plugins = [n for n in names if n in ("l2", "decoupled_decay")]
    if cfg.optimizer.weight_decay > 0 and decay_plugins:
        raise ValueError(
            f"optimizer.weight_decay={cfg.optimizer.weight_decay} together with regularizer "
            f"{decay_plugins[0]!r} decays the weights twice; set optimizer.weight_decay: 0 "
            f"or remove {decay_plugins[0]!r}"
        )
    if cfg.data.train_size is not None and cfg.data.train_size + cfg.data.val_size > 60000:
        raise ValueError(
            f"data.train_size + data.val_size = {cfg.data.train_size + cfg.data.val_size} exceeds the 60000 "
            "MNIST training images; lower one of them"
        )
    if cfg.data.batch_size < cfg.scaling.num_workers:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} is smaller than scaling.num_workers="
            f"{cfg.scaling.num_workers}: every rank needs at least one example per step"
        )
    return cfg


@dataclass(frozen=True)
class SpecModels:
    """The spec classes for one registry (their regularizer entries are that registry's plugin configs)."""

    train: type[BaseModel]
    experiment: type[BaseModel]


def _build_models(union) -> SpecModels:
    reg_type = list[union] if union is not None else list[dict]  # no plugins: any entry is refused below
    fields = dict(
        # type-check: pydantic's typing of models built at run time
        model=(ModelConfig, Field(default_factory=ModelConfig, description="The MLP.")),  # type: ignore[arg-type]
        # type-check: pydantic's typing of models built at run time
        data=(DataConfig, Field(default_factory=DataConfig, description="Splits and batch size.")),  # type: ignore[arg-type]
        optimizer=(OptimizerConfig, Field(description="sgd, adam or adamw; name it explicitly.")),
        schedule=(ScheduleConfig, Field(default_factory=ConstantSchedule, description="Learning-rate schedule.")),
        epochs=(int, Field(10, ge=1, le=10000, description="Passes over the training split.")),
        seed=(int, Field(0, ge=0, description="Seed of initialisation, batch order and dropout.")),
        regularizers=(reg_type, Field(default_factory=list, description="Regularizer plugins, by `name`.")),
        # type-check: pydantic's typing of models built at run time
        scaling=(ScalingConfig, Field(default_factory=ScalingConfig, description="DDP ranks and resources.")),  # type: ignore[arg-type]
        max_attempts=(int, Field(3, ge=1, le=100, description=(
            "How many times the daemon starts a job before it gives up: a lost rank, node or coordinator sends "
            "the job back to the queue, to resume from its last checkpoint. A failed or diverged run is final."))),
    )
    validators = {"_cross_field": model_validator(mode="after")(_check_train_config),
                  "_seed_range": field_validator("seed")(_check_seed)}
    # type-check: pydantic's typing of models built at run time
    train = create_model(  # type: ignore[call-overload]
        "TrainConfig", __config__=ConfigDict(extra="forbid"), __validators__=validators,
        __doc__="Everything one training run needs.", **fields,
    )
    experiment = create_model(
        "ExperimentSpec", __base__=train, __doc__="An l2cluster job spec: a training config, a name and a sweep.",
        name=(Annotated[str, AfterValidator(_check_name)],
              Field(description="Experiment name: 1-64 letters, digits, '_', '.', '-', starting with a letter or "
                                "digit; part of every job id and directory name.",
                    json_schema_extra={"pattern": f"^{NAME_RE.pattern}$"})),
        description=(str, Field("", max_length=2000, description="Free text shown with results.")),
        # type-check: pydantic's typing of models built at run time
        sweep=(SweepConfig, Field(default_factory=SweepConfig, description="Grid × seeds to run.")),  # type: ignore[arg-type]
    )
    return SpecModels(train, experiment)


def spec_models(registry: Registry) -> SpecModels:
    """The spec classes for this registry, built once per registry."""
    if registry.spec_models is None:
        registry.spec_models = _build_models(registry.config_union())
    return registry.spec_models


# -- errors -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Issue:
    path: str
    message: str


class SpecError(ValueError):
    """A spec was refused; carries one Issue (field path + how to fix) per problem."""

    def __init__(self, source: str, issues: Sequence[Issue]):
        self.source, self.issues = source, list(issues)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: invalid job spec ({len(self.issues)} problem{'s' * (len(self.issues) != 1)})"]
        for i in self.issues:
            lines.append(f"  {i.path or '(top level)'}")
            lines.append(f"    {i.message}")
        return "\n".join(lines)

    def __reduce__(self):
        return (type(self), (self.source, self.issues))


def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _hint(err: Mapping[str, Any], problems: dict[str, str]) -> str:
    kind, msg = err["type"], err["msg"]
    tag = (err.get("ctx") or {}).get("tag")
    if kind == "union_tag_invalid" and tag in problems:  # a plugin by that name exists but could not be loaded
        return f"plugin {tag!r} is {problems[tag]}"
    if kind == "extra_forbidden":
        return "unknown field; remove it or check its spelling"
    if kind == "missing":
        return "required field is missing; add it"
    if kind == "union_tag_invalid":
        return f"{msg}; use one of those names"
    if kind == "union_tag_not_found":
        return f"{msg}; add `name:` to say which one this is"
    return msg.removeprefix("Value error, ")


_STATIC_TAGS = frozenset({"sgd", "adam", "adamw", "constant", "step", "cosine", "plateau"})


def issues_from(err: ValidationError, tags: frozenset[str] = _STATIC_TAGS, prefix: str = "",
                problems: dict[str, str] | None = None) -> list[Issue]:
    """One Issue per pydantic error, with the path as written in the spec. `problems`: plugin name → why it is
    not loaded (refused or unavailable), to say so when a spec names it."""
    out = []
    for e in err.errors(include_url=False):
        clean: list[Any] = []
        skipped_at = -1
        for part in e["loc"]:
            prev = clean[-1] if clean else None
            in_union = prev in ("optimizer", "schedule") or (
                isinstance(prev, int) and len(clean) >= 2 and clean[-2] == "regularizers")
            # pydantic puts the tag of a tagged union in the location (optimizer.adamw.lr,
            # regularizers[0].l2.strength); drop it so paths read as they are written in the spec.
            if in_union and part in tags and skipped_at != len(clean):
                skipped_at = len(clean)
                continue
            clean.append(part)
        path = _loc(clean)
        sep = "." if prefix and path and not path.startswith("[") else ""
        out.append(Issue(f"{prefix}{sep}{path}", _hint(e, problems or {})))
    return out


def union_tags(registry: Registry) -> frozenset[str]:
    return _STATIC_TAGS | (frozenset(registry.names) if len(registry.names) > 1 else frozenset())


def plugin_problems(registry: Registry) -> dict[str, str]:
    return {p.name: f"{p.status}: {p.reason}" for p in registry.problems}


# -- loading ------------------------------------------------------------------------------------------------
MAX_SPEC_BYTES = 16 << 20  # a 10,000-value grid is well under 1 MiB
MAX_DEPTH = 32  # sections nest 4 deep; a variant's `set` a few more
MAX_VALUES = 1_000_000  # YAML aliases can make a small file hold billions of values ("billion laughs")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader — plain data only, no Python tags — that also refuses a key written twice in one mapping
    (PyYAML would silently keep the last one)."""

    def compose_node(self, parent, index):
        # Refuse deep nesting while composing: PyYAML's scanner is quadratic in the nesting depth and its
        # composer recursive, so a file of 100,000 '[' would otherwise hang, then crash.
        depth = getattr(self, "_depth", 0)
        if depth > MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                              self.peek_event().start_mark)
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def construct_mapping(self, node, deep=False):
        seen: dict[str, Any] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"found the key {key_node.value!r} twice in one mapping (first on line "
                        f"{seen[key_node.value].line + 1}); keep one of them", key_node.start_mark)
                seen[key_node.value] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _located(construct):
    """A YAML scalar constructor whose ValueError (a 5000-digit number, !!float fast, a 13th month) is a YAML
    error with the line and column, like every other mistake in the file."""

    def located(loader, node):
        try:
            return construct(loader, node)
        except ValueError as e:
            why = "a number over 4300 digits long" if "digits" in str(e) else str(e)
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {node.value[:40]!r}: {why}",
                                                    node.start_mark) from None

    return located


for _tag in ("int", "float", "timestamp"):
    _SpecLoader.add_constructor(f"tag:yaml.org,2002:{_tag}",
                                _located(yaml.SafeLoader.yaml_constructors[f"tag:yaml.org,2002:{_tag}"]))


class _DuplicateKey(ValueError):
    pass


def _json_object(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"found the key {key!r} twice in one object; keep one of them")
        out[key] = value
    return out


def read_spec_file(path: str | Path) -> dict:
    """Parse a YAML or JSON spec file into a dict; SpecError (with line and column) when it cannot be read.

    YAML is read with a safe loader: plain data only, never a Python object or tag."""
    path = Path(path)
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(source, [Issue("", f"cannot read the file: {e.strerror or e}")]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(source, [Issue("", f"the file is larger than {MAX_SPEC_BYTES >> 20} MiB; a job spec is a "
                                           "few lines (sweep over values with `grid`, not by listing jobs)")])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SpecError(source, [Issue("", f"byte {e.start}: not UTF-8 text; save the spec as UTF-8")]) from None
    try:
        if path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_json_object)
        else:
            data = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader: plain data only
    except json.JSONDecodeError as e:
        raise SpecError(source, [Issue("", f"line {e.lineno}, column {e.colno}: not valid JSON: {e.msg}")]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(source, [Issue("", f"{where}not valid YAML: {problem}")]) from None
    except RecursionError:  # JSON nested hundreds of levels deep
        raise SpecError(source, [Issue("", f"nested more than {MAX_DEPTH} levels deep")]) from None
    except _DuplicateKey as e:
        raise SpecError(source, [Issue("", f"not valid JSON: {e}")]) from None
    except ValueError as e:  # json: a number over 4300 digits long
        why = "it holds a number over 4300 digits long" if "digits" in str(e) else str(e)
        raise SpecError(source, [Issue("", f"cannot read the file: {why}")]) from None
    if not isinstance(data, dict):
        raise SpecError(source, [Issue("", "the file must hold a mapping (name:, optimizer:, …) at the top")])
    issues = structure_issues(data)
    if issues:
        raise SpecError(source, issues)
    return data


def _kind(value: Any) -> str:
    kinds = {set: "a set (YAML !!set)", frozenset: "a set", tuple: "pairs (YAML !!omap or !!pairs)",
             bytes: "binary data (YAML !!binary)", bytearray: "binary data", bool: "true/false", int: "a number",
             float: "a number", type(None): "null", list: "a list", dict: "a mapping"}
    if type(value) in kinds:
        return kinds[type(value)]
    if hasattr(value, "isoformat"):
        return "a date or time (quote it to make it text)"
    return f"a {type(value).__name__}"


def structure_issues(data: Any, *, max_issues: int = 20) -> list[Issue]:
    """What keeps `data` from being plain spec data: mappings with text keys, lists, text, numbers, true/false
    and null, at most MAX_DEPTH levels deep and MAX_VALUES values in all. Checked before anything reads it."""
    issues: list[Issue] = []
    stack: list[tuple[str, Any, int]] = [("", data, 0)]
    seen = 0
    while stack and len(issues) < max_issues:
        path, value, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            return [Issue("", f"the spec holds more than {MAX_VALUES:,} values (YAML aliases can multiply them); "
                              "a job spec is small: sweep with `grid` instead")]
        if value is None or isinstance(value, (str, bool, int, float)):
            continue
        if not isinstance(value, (dict, list)):
            issues.append(Issue(path, f"{_kind(value)} is not allowed in a job spec; use text, numbers, true/false, "
                                      "null, lists and mappings"))
            continue
        if depth >= MAX_DEPTH:
            issues.append(Issue(path, f"nested more than {MAX_DEPTH} levels deep"))
            continue
        if isinstance(value, list):
            stack.extend((f"{path}[{i}]", v, depth + 1) for i, v in reversed(list(enumerate(value))))
            continue
        for key, v in reversed(list(value.items())):
            if not isinstance(key, str):
                issues.append(Issue(path, f"the key {reprlib.repr(key)} is {_kind(key)}, not a field name; field "
                                          "names are text (quote it or remove it)"))
                continue
            stack.append((f"{path}.{key}" if path else key, v, depth + 1))
    return issues


def parse_spec(data: dict, registry: Registry, source: str = "<spec>"):
    """Validate a spec dict into an ExperimentSpec; raises SpecError naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError(source, [Issue("", f"a job spec is a mapping (name:, optimizer:, …), not {_kind(data)}")])
    issues = structure_issues(data)
    if issues:
        raise SpecError(source, issues)
    try:
        spec = spec_models(registry).experiment.model_validate(data)
    except ValidationError as e:
        raise SpecError(source, issues_from(e, union_tags(registry), problems=plugin_problems(registry))) from None
    issues = bools_as_numbers(spec, data)
    if issues:
        raise SpecError(source, issues)
    return spec


def bools_as_numbers(model: BaseModel, data: Any, path: str = "") -> list[Issue]:
    """Numeric fields that were given true/false. pydantic reads them as 1/0, so `epochs: yes` would silently
    train one epoch; a spec that writes a boolean where a number belongs has a mistake in it."""
    issues: list[Issue] = []
    if not isinstance(data, dict):
        return issues
    for name in type(model).model_fields:
        if name in data:
            issues += _bools_in(getattr(model, name), data[name], f"{path}.{name}" if path else name)
    return issues


def _bools_in(value: Any, raw: Any, path: str) -> list[Issue]:
    if isinstance(raw, bool) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [Issue(path, f"expected a number, got {str(raw).lower()}")]
    if isinstance(value, BaseModel):
        return bools_as_numbers(value, raw, path)
    if isinstance(value, (list, tuple)) and isinstance(raw, list) and len(raw) == len(value):
        return [i for k, (v, r) in enumerate(zip(value, raw)) for i in _bools_in(v, r, f"{path}[{k}]")]
    return []


def load_spec(path: str | Path, registry: Registry):
    return parse_spec(read_spec_file(path), registry, source=str(path))


# -- sweep expansion ----------------------------------------------------------------------------------------
# Settings of how the daemon runs a job, not of what it computes: changing them keeps the job's identity.
NOT_IN_JOB_ID: dict[str, Any] = {"max_attempts": True, "scaling": {"pack"}}


@dataclass(frozen=True)
class Job:
    """One concrete training run of an experiment."""

    id: str
    experiment: str
    label: str
    overrides: dict[str, Any]
    seed: int
    config: Any  # TrainConfig
    plugins: dict[str, str] = field(default_factory=dict)
    """The code version of each plugin the job uses, by name (l2cluster.registry.PluginInfo.version)."""

    @property
    def group(self) -> str:
        """Hash of the config and plugin versions without the seed: the jobs that differ only by seed share it."""
        cfg = identity(self.config)
        cfg.pop("seed")
        return job_digest(self.experiment, cfg, self.plugins)


# Fields added after job ids were first handed out, with the value every earlier job had: left out of a job's
# identity while they keep that value, so the jobs of an existing store keep their ids (and stored results).
_ADDED_LATER = {("model", "tf32"): False}


def identity(config) -> dict:
    """What a job's id hashes (with its experiment's name): the resolved config without how it is run."""
    cfg = config.model_dump(mode="json", exclude=NOT_IN_JOB_ID)
    for (section, name), default in _ADDED_LATER.items():
        if cfg.get(section, {}).get(name) == default:
            del cfg[section][name]
    return cfg


def plugin_versions(config, registry: Registry) -> dict[str, str]:
    """The code version of each plugin a resolved config uses."""
    return {r.name: registry.get(r.name).version for r in config.regularizers}


def job_digest(experiment: str, cfg: dict, plugins: dict[str, str]) -> str:
    """A job's id (or, without the seed in `cfg`, its group): the experiment's name, the job's identity and the
    versions of its plugins' code, so that changed plugin code never reuses a stored result. A job without
    plugins hashes what it did before versions were part of ids, and keeps its id."""
    obj: dict[str, Any] = {"experiment": experiment, "config": cfg}
    if plugins:
        obj["plugins"] = plugins
    return _digest(obj)


def experiment_id(spec, jobs: Sequence[Job]) -> str:
    """`<name>-<8 hex>`: the spec as validated and the plugin versions its jobs use. Resubmitting the same spec
    with the same plugin code names the same experiment; changed plugin code (new job ids) a new one."""
    obj: Any = spec.model_dump(mode="json")
    plugins = {name: v for job in jobs for name, v in job.plugins.items()}
    if plugins:
        obj = {"spec": obj, "plugins": plugins}
    return f"{spec.name}-{hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


class PathError(ValueError):
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
    # type-check: None is the index of the base variant
    variants = list(enumerate(spec.sweep.variants)) or [(None, Variant(label="base"))]  # type: ignore[list-item]
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
                job_id = job_digest(spec.name, identity(config), plugins)
                if job_id in seen:
                    continue  # two grid points that resolve to the same config run once
                seen.add(job_id)
                label = variant.label if vi is not None else ""
                jobs.append(Job(job_id, spec.name, label, overrides, seed, config, plugins))
    return jobs
