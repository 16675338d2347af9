"""The typed records that cross Ray between a gang's ranks and the coordinator (and that `train` prints).

A rank describes itself with a `RankInfo`, and returns a `RankOutcome` from each run: a `JobResult` per member
job, or the error of a crash. A `JobResult` is complete on every path — a crash or a refused plugin is
`JobResult.failed(error)` — and becomes columns and JSON only where the store records it (`Store.finish`). It is
made from the trainer's `RunResult`, which a model fills in while it trains (and a checkpoint keeps), once the
model has ended. Plain Python (no torch, no Ray): the results code imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from l2cluster.states import Outcome

# One epoch's metrics as the trainer reports them: "epoch", losses and accuracies, lr, norms, step counts, each
# loss plugin's metric and "epoch_s" (an open set of names: plugins add theirs). Stored as JSON as it is.
EpochMetrics = dict[str, Any]


@dataclass(frozen=True)
class JobResult:
    """How one job's run ended: its outcome, final metrics, error and whole per-epoch history."""

    outcome: Outcome
    final: dict[str, Any] = field(default_factory=dict)
    """Final numbers: the last epoch's metrics, best_val_acc/best_epoch, test metrics (None for a job that ended
    early), train_s, and from the runner param_sum and cuda_graphs."""
    error: str | None = None
    diverged_epoch: int | None = None
    epochs: list[EpochMetrics] = field(default_factory=list)
    resumed_from_epoch: int = 0  # the checkpoint's epoch this run started from (0: from scratch)

    def __post_init__(self) -> None:
        object.__setattr__(self, "outcome", Outcome(self.outcome))  # "failed" → Outcome.FAILED; others raise

    @classmethod
    def failed(cls, error: str) -> JobResult:
        """The result of a run that ended with an error before it produced any numbers (a crash, a refused plugin)."""
        return cls(Outcome.FAILED, error=error)


@dataclass(frozen=True)
class RankInfo:
    """What a rank says about itself (RankWorker.info): read when its gang forms, listed by `l2cluster gangs`."""

    pid: int
    node: str  # "<node IP>/<first 6 hex of the Ray node id>"
    rank: int
    gpu_bytes: int | None  # its GPU's memory; None on a CPU rank
    process_groups_started: int  # 1 for a gang kept warm: a new process group per job would be more
    jobs_run: int


@dataclass(frozen=True)
class RankOutcome:
    """What one rank's run() returns to the coordinator: the pack's per-member results (job id → JobResult), or,
    when the run crashed outside the trainer's own handling, the error and its traceback."""

    results: dict[str, JobResult] = field(default_factory=dict)
    resumed_from_epoch: int | None = None
    split: bool = False  # the pack split (a member's hook raised) and its members trained again alone
    error: str | None = None
    traceback: str | None = None

    @property
    def crashed(self) -> bool:
        return self.traceback is not None
