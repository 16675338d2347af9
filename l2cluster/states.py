"""Job states, the outcomes a job ends with, and the one table of transitions between states."""

from __future__ import annotations

from enum import Enum

from l2cluster.errors import L2ClusterError


class JobState(str, Enum):
    """Where a job is: queued → placing → running → succeeded | failed | diverged | cancelled (→ queued again
    only on a rerun); queued → failed for a job the cluster can never hold."""

    QUEUED = "queued"
    PLACING = "placing"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DIVERGED = "diverged"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.DIVERGED, JobState.CANCELLED})


class Outcome(str, Enum):
    """How a job ended: one of the terminal states, by the same name (the value stored in results.outcome)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DIVERGED = "diverged"
    CANCELLED = "cancelled"

    @property
    def state(self) -> JobState:
        """The terminal state a job with this outcome is in."""
        return JobState(self.value)


# The terminal states' names in display order, for code that compares the strings of rows and records.
TERMINAL_STATES: tuple[str, ...] = tuple(s.value for s in JobState if s in _TERMINAL)

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # A job the whole cluster can never hold fails from the queue, without pretending to be placed.
    JobState.QUEUED: frozenset({JobState.PLACING, JobState.FAILED, JobState.CANCELLED}),
    # Placing can fail (no resources, a gang that died while forming): back to the queue or failed.
    JobState.PLACING: frozenset({JobState.RUNNING, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}),
    # Running → queued is a retry: a rank died and the job goes back with attempt + 1.
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.DIVERGED, JobState.CANCELLED,
                                 JobState.QUEUED}),
    # An ended job goes back to the queue only when a rerun is asked for (`submit --rerun`): Store.rerun, which
    # deletes its result in the same transaction.
    JobState.SUCCEEDED: frozenset({JobState.QUEUED}),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.DIVERGED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
}


class InvalidTransition(L2ClusterError, ValueError):
    """A state change the table does not allow (a bug in the caller, or a stale update)."""

    def __init__(self, job_id: str, old: str, new: str):
        self.job_id, self.old, self.new = job_id, old, new
        super().__init__(f"job {job_id}: {old} → {new} is not a valid transition")

    def __reduce__(self):
        return (type(self), (self.job_id, self.old, self.new))


def check_transition(job_id: str, old: JobState | str, new: JobState | str) -> JobState:
    """Return the new state if `old → new` is allowed; raise InvalidTransition otherwise."""
    old, new = JobState(old), JobState(new)
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(job_id, old.value, new.value)
    return new
