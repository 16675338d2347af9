"""The scheduler: which queued packs start, on which gangs, and what must fail or be released first (pure).

`plan(queued, gangs, cluster)` reads plain records and returns actions; it calls nothing (no Ray, no store): the
coordinator gathers the inputs, plans, and applies the actions in order. Resource arithmetic lives here only
(`Resources.of(shape)`, `fits`, `count`).

Rules, per queued pack in queue order (priority, then submission):

1. An idle gang of its shape: start on it.
2. The whole cluster could never hold its gang (or it asks for a GPU and there is none): fail it.
3. Its gang fits in what is free: start it on a new gang.
4. Otherwise it is blocked. An idle gang of another shape holds resources: release the one idle longest and
   stop planning (its resources come back asynchronously; the next tick plans again).
5. Anti-starvation: the *first* blocked pack reserves what it needs of what is free now (per resource, at most
   what is free). Later packs start on new gangs only if they fit in what is left after that reservation, so a
   stream of small jobs cannot keep taking the room a large gang waits for. Only the first blocked pack reserves
   (later blocked ones wait their turn in queue order). Idle gangs of other shapes go to the blocked pack by
   rule 4 (released) before a later pack could reuse them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

_EPS = 1e-9  # resources are floats (fractional CPUs and GPUs): compare with a tolerance


@dataclass(frozen=True)
class GangShape:
    """What a gang offers: jobs with the same shape run on the same gangs."""

    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float  # 0 for CPU gangs

    @classmethod
    def of_scaling(cls, scaling: dict, gpus_in_cluster: float) -> GangShape:
        """The shape a job's `scaling` section asks for, on a cluster with this many GPUs."""
        use_gpu = scaling["use_gpu"] is True or (scaling["use_gpu"] == "auto" and gpus_in_cluster > 0)
        return cls(scaling["num_workers"], scaling["cpus_per_worker"],
                   scaling["gpus_per_worker"] if use_gpu else 0.0)

    def bundles(self) -> list[dict[str, float]]:
        """One placement-group bundle per rank."""
        bundle = {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}
        return [dict(bundle) for _ in range(self.num_workers)]


@dataclass(frozen=True)
class Resources:
    """An amount of CPUs and GPUs: a gang's need, the cluster's total, what is free."""

    cpus: float = 0.0
    gpus: float = 0.0

    @classmethod
    def of(cls, shape: GangShape) -> Resources:
        """What a gang of this shape takes: every rank's CPUs and GPUs."""
        return cls(shape.cpus_per_worker * shape.num_workers, shape.gpus_per_worker * shape.num_workers)

    @classmethod
    def of_ray(cls, resources: dict[str, float]) -> Resources:
        """From Ray's `cluster_resources()` / `available_resources()` dicts."""
        return cls(resources.get("CPU", 0.0), resources.get("GPU", 0.0))

    def fits(self, need: Resources) -> bool:
        """Whether `need` fits in these resources."""
        return need.cpus <= self.cpus + _EPS and need.gpus <= self.gpus + _EPS

    def count(self, need: Resources) -> int:
        """How many of `need` these resources hold at once (at least 1: a pack is never split for want of room)."""
        n = self.cpus // max(_EPS, need.cpus)
        if need.gpus:
            n = min(n, self.gpus // need.gpus)
        return max(1, int(n))

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpus + other.cpus, self.gpus + other.gpus)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpus - other.cpus, self.gpus - other.gpus)

    def capped(self, limit: Resources) -> Resources:
        """These resources, at most `limit` of each (never below zero)."""
        return Resources(max(0.0, min(self.cpus, limit.cpus)), max(0.0, min(self.gpus, limit.gpus)))

    def __str__(self) -> str:
        return f"{self.cpus:g} CPU(s) and {self.gpus:g} GPU(s)"


@dataclass(frozen=True)
class QueuedPack:
    """Queued jobs that start together on one gang (a pack, formed by the coordinator; often a single job).
    `head` is its first job in queue order: actions name the pack by it."""

    head: str
    shape: GangShape
    job_ids: tuple[str, ...] = ()  # every member in the queue; () means (head,)
    requires_gpu: bool = False  # scaling.use_gpu: true (never runs on a cluster without GPUs)

    @property
    def jobs(self) -> tuple[str, ...]:
        return self.job_ids or (self.head,)


@dataclass(frozen=True)
class GangView:
    """What the scheduler needs to know of a gang."""

    id: str
    shape: GangShape
    ready: bool  # formed (its process group is up)
    busy: bool  # a pack runs, or is being placed, on it
    idle_since: float = 0.0


@dataclass(frozen=True)
class Cluster:
    """The cluster's resources: all of them, and what is free now (gangs being formed already subtracted)."""

    total: Resources
    free: Resources


@dataclass(frozen=True)
class NewGang:
    shape: GangShape


@dataclass(frozen=True)
class Start:
    """Start the pack headed by `head` on the idle gang `gang` (its id), or on a new gang."""

    head: str
    gang: str | NewGang


@dataclass(frozen=True)
class Fail:
    """Fail a queued job straight from the queue: the whole cluster can never hold its gang."""

    job_id: str
    reason: str


@dataclass(frozen=True)
class Release:
    """Release an idle gang (its resources are wanted by another shape)."""

    gang_id: str
    reason: str


Action = Start | Fail | Release


@dataclass
class _Room:
    """What is free while planning, and the reservation of the first blocked pack."""

    free: Resources
    reserved: Resources = field(default_factory=Resources)
    blocked: str | None = None  # the head of the pack the reservation is for

    def left(self) -> Resources:
        return self.free - self.reserved


def plan(queued: Sequence[QueuedPack], gangs: Sequence[GangView], cluster: Cluster) -> list[Action]:
    """The actions of one scheduling tick, in the order they are to be applied (see the module's rules)."""
    actions: list[Action] = []
    idle = [g for g in gangs if not g.busy]
    room = _Room(cluster.free)
    for pack in queued:
        gang = next((g for g in idle if g.shape == pack.shape), None)
        if gang is not None:
            idle.remove(gang)
            actions.append(Start(pack.head, gang.id))
            continue
        need = Resources.of(pack.shape)
        why = _never_fits(pack, need, cluster.total)
        if why:
            actions.extend(Fail(job_id, why) for job_id in pack.jobs)
            continue
        if room.left().fits(need):
            room.free -= need
            actions.append(Start(pack.head, NewGang(pack.shape)))
            continue
        other = sorted((g for g in idle if g.ready and g.shape != pack.shape), key=lambda g: g.idle_since)
        if other:
            actions.append(Release(other[0].id, "room for another shape"))
            return actions
        if room.blocked is None:
            room.blocked, room.reserved = pack.head, need.capped(room.free)
    return actions


def _never_fits(pack: QueuedPack, need: Resources, total: Resources) -> str | None:
    """Why the whole cluster can never hold this pack's gang; None when it can."""
    if total.fits(need) and not (pack.requires_gpu and not total.gpus):
        return None
    return (f"needs {need}" + (" (scaling.use_gpu: true)" if pack.requires_gpu else "")
            + f"; the whole cluster has {total}: lower scaling.num_workers / cpus_per_worker, or set use_gpu: auto")
