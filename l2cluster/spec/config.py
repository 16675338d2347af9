"""The pydantic models of a job spec: model, data, optimizer, schedule, scaling and sweep sections, the static
`TrainConfig` they make up, and the registry-specific models whose `regularizers` entries are the plugins' configs.

`TrainConfig` holds every field of a training config that does not depend on plugins; `spec_models(registry)`
builds (once per registry and set of plugins) the subclass that types `regularizers` by the loaded plugins, and
the `ExperimentSpec` that adds a name and a sweep. Code that only reads a config can be typed with `TrainConfig`.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    import torch

    from l2cluster.registry import Registry  # only a type here: reading a spec loads no plugin code


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

    def _lr(self, params: list[torch.nn.Parameter], capturable: bool):
        """The lr to build with: with `capturable` a device tensor (a CUDA graph reads it; see graphs.DeviceLR)."""
        import torch

        return torch.tensor(self.lr, device=params[0].device) if capturable else self.lr


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

    def build(self, params: list[torch.nn.Parameter], *, capturable: bool = False) -> torch.optim.Optimizer:
        """torch's fused SGD (one kernel per parameter). `capturable`: the lr is a device tensor."""
        import torch

        return torch.optim.SGD(params, lr=self._lr(params, capturable), momentum=self.momentum,
                               nesterov=self.nesterov, weight_decay=self.weight_decay, fused=True)


class AdamConfig(_Optimizer):
    """torch.optim.Adam; its weight_decay is an L2 term folded into the gradient (coupled)."""

    name: Literal["adam"]
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    """Decay rates of the first and second moment estimates."""
    eps: float = Field(1e-8, gt=0)
    """Added to the denominator for numerical stability."""

    def build(self, params: list[torch.nn.Parameter], *, capturable: bool = False) -> torch.optim.Optimizer:
        """torch's fused Adam or AdamW (one kernel per parameter instead of ~10; 3x faster steps on CPU), with
        weight_decay always passed: AdamW's library default (1e-2) must never apply silently. `capturable`: the
        lr is a device tensor and the step count lives on the device, as CUDA graphs need."""
        import torch

        cls = torch.optim.AdamW if self.name == "adamw" else torch.optim.Adam
        return cls(params, lr=self._lr(params, capturable), betas=(self.betas[0], self.betas[1]), eps=self.eps,
                   weight_decay=self.weight_decay, fused=True, capturable=capturable)


class AdamWConfig(AdamConfig):
    """torch.optim.AdamW; its weight_decay is decoupled (Loshchilov & Hutter) and defaults to 0 here."""

    # type-check: each optimizer narrows the tag to its own name (pydantic's discriminated union)
    name: Literal["adamw"]  # type: ignore[assignment]


class ConstantSchedule(_Strict):
    """The learning rate stays at optimizer.lr."""

    name: Literal["constant"] = "constant"

    def build(self, optimizer: torch.optim.Optimizer, epochs: int) -> None:
        """No scheduler: the lr never changes."""
        return None


class StepSchedule(_Strict):
    """Multiply the learning rate by gamma every step_size epochs."""

    name: Literal["step"]
    step_size: int = Field(ge=1)
    """Epochs between decays."""
    gamma: float = Field(0.1, gt=0, le=1)
    """Decay factor."""

    def build(self, optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
        import torch

        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.step_size, gamma=self.gamma)


class CosineSchedule(_Strict):
    """Cosine annealing from optimizer.lr to min_lr over t_max epochs."""

    name: Literal["cosine"]
    t_max: int | None = Field(None, ge=1)
    """Epochs of one half cosine; default: the job's epochs."""
    min_lr: float = Field(0.0, ge=0)
    """Learning rate at the end of the cosine."""

    def build(self, optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
        import torch

        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.t_max or epochs, eta_min=self.min_lr)


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

    def build(self, optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
        """Stepped with the mean validation loss of the stack's live models (the trainer refuses K > 1)."""
        import torch

        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=self.factor,
                                                          patience=self.patience, threshold=self.threshold,
                                                          min_lr=self.min_lr)


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


class TrainConfig(BaseModel):
    """Everything one training run needs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    # type-check: pydantic takes a model class as its default factory

    model: ModelConfig = Field(default_factory=ModelConfig)  # type: ignore[arg-type]
    """The MLP."""
    # type-check: pydantic takes a model class as its default factory
    data: DataConfig = Field(default_factory=DataConfig)  # type: ignore[arg-type]
    """Splits and batch size."""
    optimizer: OptimizerConfig
    """sgd, adam or adamw; name it explicitly."""
    schedule: ScheduleConfig = Field(default_factory=ConstantSchedule)
    """Learning-rate schedule."""
    epochs: int = Field(10, ge=1, le=10000)
    """Passes over the training split."""
    seed: int = Field(0, ge=0)
    """Seed of initialisation, batch order and dropout."""
    regularizers: list[Any] = Field(default_factory=list)
    """Regularizer plugins, by `name`. Typed loosely here: the model `spec_models(registry).train` types each entry
    as the config of one of the registry's plugins."""
    # type-check: pydantic takes a model class as its default factory
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)  # type: ignore[arg-type]
    """DDP ranks and resources."""
    max_attempts: int = Field(3, ge=1, le=100)
    """How many times the daemon starts a job before it gives up: a lost rank, node or coordinator sends the job \
back to the queue, to resume from its last checkpoint. A failed or diverged run is final."""

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v: int) -> int:
        if not 0 <= v <= MAX_SEED:
            raise ValueError(f"must be between 0 and {MAX_SEED} (2^63 - 1), got {v}")
        return v

    @model_validator(mode="after")
    def _cross_field(self):
        names = [r.name for r in self.regularizers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"regularizers: {dupes} listed more than once; give each regularizer once")
        decay_plugins = [n for n in names if n in ("l2", "decoupled_decay")]
        if self.optimizer.weight_decay > 0 and decay_plugins:
            raise ValueError(
                f"optimizer.weight_decay={self.optimizer.weight_decay} together with regularizer "
                f"{decay_plugins[0]!r} decays the weights twice; set optimizer.weight_decay: 0 "
                f"or remove {decay_plugins[0]!r}"
            )
        if self.data.train_size is not None and self.data.train_size + self.data.val_size > 60000:
            raise ValueError(
                f"data.train_size + data.val_size = {self.data.train_size + self.data.val_size} exceeds the 60000 "
                "MNIST training images; lower one of them"
            )
        if self.data.batch_size < self.scaling.num_workers:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} is smaller than scaling.num_workers="
                f"{self.scaling.num_workers}: every rank needs at least one example per step"
            )
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


# -- the models of one registry -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SpecModels:
    """The spec classes for one registry (their regularizer entries are that registry's plugin configs)."""

    train: type[TrainConfig]
    experiment: type[TrainConfig]


def _no_plugin_loaded(entry: dict) -> dict:
    raise ValueError(f"no regularizer plugin is loaded, so {entry.get('name', entry)!r} cannot be used; load the "
                     "built-ins (l2cluster.registry.load_registry) or the plugin's folder (--plugin-dir)")


def _build_models(union) -> SpecModels:
    # No plugins loaded: any entry is refused, as an unknown plugin name would be.
    reg_type = list[union] if union is not None else list[Annotated[dict, AfterValidator(_no_plugin_loaded)]]
    train = create_model(
        "TrainConfig", __base__=TrainConfig, __doc__=TrainConfig.__doc__,
        regularizers=(reg_type, Field(default_factory=list, description="Regularizer plugins, by `name`.")),
    )
    experiment = create_model(
        "ExperimentSpec", __base__=train, __doc__="An l2cluster job spec: a training config, a name and a sweep.",
        name=(Annotated[str, AfterValidator(_check_name)],
              Field(description="Experiment name: 1-64 letters, digits, '_', '.', '-', starting with a letter or "
                                "digit; part of every job id and directory name.",
                    json_schema_extra={"pattern": f"^{NAME_RE.pattern}$"})),
        description=(str, Field("", max_length=2000, description="Free text shown with results.")),
        # type-check: pydantic takes a model class as its default factory
        sweep=(SweepConfig, Field(default_factory=SweepConfig, description="Grid × seeds to run.")),  # type: ignore[arg-type]
    )
    return SpecModels(train, experiment)


# Registry → (the plugin configs the models were built from, the models). Kept here, not on the registry: a
# registry knows nothing of specs. Weak keys: the models go when their registry does.
_MODELS: weakref.WeakKeyDictionary[Registry, tuple[tuple[type[BaseModel] | None, ...], SpecModels]] = (
    weakref.WeakKeyDictionary())


def spec_models(registry: Registry) -> SpecModels:
    """The spec classes for this registry, built once per registry and set of plugins (a plugin registered later
    builds them again)."""
    plugins = tuple(registry.get(name).config_model for name in registry.names)
    cached = _MODELS.get(registry)
    if cached is None or cached[0] != plugins:
        cached = _MODELS[registry] = (plugins, _build_models(registry.config_union()))
    return cached[1]
