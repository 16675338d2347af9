"""The coordinator: a named Ray actor that owns the queue and the store and runs jobs on warm gangs.

Queue order is priority, then submission. Jobs run concurrently up to what the cluster can hold: a queued job
takes an idle gang of its shape, or a new gang when the cluster has room, together with the queued jobs of the
same priority that may be packed with it (l2cluster.packing: one stacked model, up to the pack size the gang's
device allows). Each tick gathers the queue (as packs), the gangs and the free resources, asks the pure
l2cluster.cluster.scheduler.plan what to start, fail or release, and applies that. Scheduling reads only keys stored at
submission; no config is validated per tick. Every state change goes through the store; the reads of `status`,
`logs`, `results` and `export` run in a worker thread on a read-only connection, and the resources are asked of Ray
in one, off the event loop. Idle gangs are released after
`idle_release_s`. On start it re-queues what a previous coordinator left placing or running (a pack keeps its
members), so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayError

from l2cluster.cluster.gang import Gang, remove_orphaned_placement_groups
from l2cluster.cluster.scheduler import (
    Cluster,
    Fail,
    GangShape,
    GangView,
    NewGang,
    QueuedPack,
    Release,
    Resources,
    plan,
)
from l2cluster.errors import NotFoundError
from l2cluster.ids import pack_id
from l2cluster.log import configure_logging, get_logger
from l2cluster.packing import ASSUMED_GPU_BYTES, group_into_packs, max_members
from l2cluster.records import EpochMetrics, JobResult, RankOutcome
from l2cluster.results.store import Store, experiment_jobs, experiment_rows, job_dict, job_log
from l2cluster.states import JobState, Outcome
from l2cluster.training.checkpoint import remove_job
from l2cluster.training.data import DataError

_TICK_S = 0.05
_CRASH_GRACE_S = 10.0  # how long the other ranks may take to notice a crashed rank before the gang is dropped
_HEALTH_TIMEOUT_S = 15.0  # how long an idle gang's ranks may take to answer before a job is assigned to it


@dataclass
class RunningPack:
    """A pack on a gang: all its members in training order, and those this run trains for (the others ended
    earlier and ride along masked)."""

    id: str
    gang: Gang
    members: list[str]
    active: list[str]
    attempts: dict[str, int]
    cancel_all: bool = False
    cancelled: set[str] = field(default_factory=set)
    stage: str = "placing"  # shown by `status`: what placing waits for ("loading MNIST", "forming a gang"), "training"


@dataclass
class _Pack:
    """A queued pack while a tick is planned: a job queued with a pack id (and its pack's other queued members),
    or a new pack of queued jobs that may train together."""

    head: str
    shape: GangShape
    requires_gpu: bool
    pack_id: str | None  # the pack it rejoins; None: a new pack, recorded when it starts
    job_ids: list[str]

    def queued(self) -> QueuedPack:
        return QueuedPack(self.head, self.shape, tuple(self.job_ids), self.requires_gpu)


@ray.remote(num_cpus=0, max_restarts=-1)
class Coordinator:
    def __init__(self, store_path: str, *, plugin_dirs: list[str] | None = None, data_dir: str | None = None,
                 idle_release_s: float = 60.0, strategy: str = "STRICT_PACK", max_jobs: int = 10_000,
                 form_timeout_s: float = 120.0, checkpoint_dir: str | None = None, max_pack: int | None = None):
        from l2cluster.registry import load_registry

        configure_logging(json=True)
        self.log = get_logger(component="coordinator")
        self.store = Store(store_path)
        # Every rank writes its job's checkpoints here: on a multi-node cluster, point it at shared storage.
        self.checkpoint_dir = str(Path(checkpoint_dir or Path(store_path).parent / "checkpoints").expanduser())
        Path(self.checkpoint_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.plugin_dirs = list(plugin_dirs or [])
        self.registry = load_registry(self.plugin_dirs)
        self.data_dir = data_dir
        self.idle_release_s, self.strategy, self.max_jobs = idle_release_s, strategy, max_jobs
        self.form_timeout_s = form_timeout_s
        self.max_pack = max_pack  # None: from the device (l2cluster.packing.max_members)
        self.gangs: dict[str, Gang] = {}
        self.running: dict[str, RunningPack] = {}  # job id → the pack it runs in
        self.gpu_bytes: dict[GangShape, int] = {}  # the smallest GPU of each shape's gangs, once one has formed
        self._scalings: dict[str, dict] = {}
        self.placement_failures: dict[str, int] = {}  # job id → gangs that failed to form for it in a row
        self.pending = Resources()  # what gangs being formed will take (not yet shown as used by Ray)
        self.mnist_ref = None
        self._mnist_lock = threading.Lock()  # MNIST loads in a thread (the event loop keeps answering `status`)
        # The latest in-epoch progress and validation accuracy of each running job (memory only, never the store):
        # job id → {"epoch" (in progress), "step", "steps", "val_acc"}.
        self.live: dict[str, dict] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._releasing: set[asyncio.Task] = set()  # gangs being released in a thread (_drop)
        # Jobs a previous coordinator left in flight go back to the queue: their gangs were its actors and died
        # with it (their placement groups do not: release them). The jobs resume from their last checkpoints.
        orphans = remove_orphaned_placement_groups()
        if orphans:
            self.log.info("orphaned_gangs_released", placement_groups=orphans)
        for row in self.store.jobs(states=[JobState.PLACING, JobState.RUNNING]):
            if row["state"] == JobState.PLACING:
                self.store.transition(row["id"], JobState.QUEUED, detail="the coordinator restarted while it was "
                                      "being placed; re-queued (no attempt counted: it had not started training)")
            else:
                self._retry_or_fail(row["id"], "the coordinator restarted")
        # Ray restarts a killed coordinator with no caller: start scheduling now, not at the first request.
        self._ensure_loop()

    # -- public API (called by the CLI) ---------------------------------------------------------------------
    async def ping(self) -> dict:
        self._ensure_loop()
        return {"store": str(self.store.path), "gangs": len(self.gangs), "running": len(self.running),
                "pid": os.getpid()}

    async def submit(self, spec: dict, priority: int = 0, source: str = "<spec>", rerun: bool = False,
                     plugins: dict[str, tuple[str, str]] | None = None) -> dict:
        """Validate and queue an experiment. Jobs already in the store keep their state and results (`reused`),
        unless `rerun` queues those that ended again (`rerun`). `plugins` are the versions of the plugins the
        client sees (l2cluster.registry.versions). Raises SpecError (with every bad field), or PluginChangedError
        when a plugin the jobs use is not the code this daemon loaded. Returns the experiment id and the counts
        of its jobs: all, new, reused, rerun."""
        from l2cluster.ids import experiment_id
        from l2cluster.registry import check_unchanged
        from l2cluster.spec.loading import parse_spec
        from l2cluster.spec.sweep import expand

        self._ensure_loop()

        def validate_and_add():
            # A large sweep takes a while to validate, expand and insert (5,000 jobs: ~0.8 s on one core): in a
            # worker thread, with a connection of its own, so that scheduling and other calls go on meanwhile.
            parsed = parse_spec(spec, self.registry, source=source)
            jobs = expand(parsed, self.registry, max_jobs=self.max_jobs)
            check_unchanged(self.registry, {name for job in jobs for name in job.plugins}, plugins,
                            restart=self._restart_command())
            exp_id = experiment_id(parsed, jobs)
            store = self.store.another_connection()
            try:
                added = store.add_experiment(exp_id, parsed.name, parsed.model_dump(mode="json"), jobs,
                                             priority=priority)
            finally:
                store.close()
            return parsed, jobs, exp_id, added

        parsed, jobs, exp_id, added = await asyncio.to_thread(validate_and_add)
        # New jobs are queued: the ended ones were in the store already. A job that ended while its pack still
        # trains is left as it is (its pack would report to it again); it shows as reused.
        ended = [j.id for j in jobs if self._terminal(j.id) and j.id not in self.running]
        requeued = self.store.rerun(ended, priority=priority) if rerun else 0
        reused = sum(1 for j in jobs if self._terminal(j.id))
        self.log.info("experiment_submitted", experiment=exp_id, jobs=len(jobs), new=added, reused=reused,
                      rerun=requeued)
        # type-check: _ensure_loop() made the event before any call gets here
        self._wake.set()  # type: ignore[union-attr]
        return {"experiment": exp_id, "jobs": len(jobs), "new": added, "reused": reused, "rerun": requeued}

    async def status(self, experiment_id: str | None = None) -> list[dict]:
        self._ensure_loop()
        if experiment_id is None:
            return await self._read(experiment_rows)
        jobs = await self._read(lambda store: experiment_jobs(store, experiment_id))
        for job in jobs:  # running and placing jobs: how far they are, from memory (`live`)
            running = self.running.get(job["job"])
            if running is not None:
                job["live"] = {"stage": running.stage, **self.live.get(job["job"], {})}
        return jobs

    async def results(self, experiment_id: str) -> list[dict]:
        def read(store: Store) -> list[dict]:
            rows = store.jobs(store.resolve_experiment(experiment_id))
            return [{**job_dict(r), "result": store.result(r["id"])} for r in rows]

        return await self._read(read)

    async def export(self, experiment_id: str, epochs: bool = True) -> dict:
        """An experiment's jobs with config, group key, result and per-epoch metrics, for `results` and `report`
        (l2cluster.results.aggregate.export_experiment): the CLI may not see the store file on a remote cluster."""
        from l2cluster.results.aggregate import export_experiment

        return await self._read(lambda store: export_experiment(store, experiment_id, epochs=epochs))

    async def _read(self, read):
        """`read(store)` in a worker thread on a read-only connection of its own, opened and closed in that thread
        (an SQLite connection belongs to the thread that made it; the writer's stays on the event loop). A large
        experiment's status, log or export must not stall the event loop, which schedules and answers every other
        call. WAL lets the reader in beside the writer; it sees every committed transaction."""
        def in_thread():
            store = Store.open_read_only(self.store.path)
            try:
                return read(store)
            finally:
                store.close()

        return await asyncio.to_thread(in_thread)

    async def logs(self, job_id: str) -> dict:
        return await self._read(lambda store: job_log(store, job_id))

    async def cancel(self, target: str) -> int:
        """Cancel an experiment's unfinished jobs, or one job; returns how many were cancelled or told to stop."""
        self._ensure_loop()
        try:
            rows = self.store.jobs(self.store.resolve_experiment(target))
        except KeyError as not_experiment:
            try:
                # type-check: a job the store holds: its row is never None here
                rows = [self.store.job(self.store.resolve_job(target))]  # type: ignore[list-item]
            except KeyError as not_job:
                ambiguous = [e.args[0] for e in (not_experiment, not_job) if "ambiguous" in e.args[0]]
                raise NotFoundError(ambiguous[0] if ambiguous else f"no experiment or job {target!r}; `l2cluster "
                               "status` lists experiments, `l2cluster status EXPERIMENT` their jobs") from None
        n = 0
        packs: dict[str, RunningPack] = {}
        for row in rows:
            state = JobState(row["state"])
            if state is JobState.QUEUED:
                self.store.transition(row["id"], JobState.CANCELLED, detail="cancelled while queued")
                n += 1
            elif not state.is_terminal and row["id"] in self.running:
                running = self.running[row["id"]]
                running.cancelled.add(row["id"])
                packs[running.id] = running
                n += 1
        for running in packs.values():
            # The whole pack stops when every member it trains for is cancelled; else only those members do.
            if running.cancel_all or set(running.active) <= running.cancelled:
                running.cancel_all = True
                for w in running.gang.workers:
                    w.cancel.remote()
            else:
                for job_id in running.cancelled:
                    for w in running.gang.workers:
                        w.cancel.remote(job_id)
        # type-check: _ensure_loop() made the event before any call gets here
        self._wake.set()  # type: ignore[union-attr]
        return n

    async def gangs_info(self) -> list[dict]:
        out = []
        for g in list(self.gangs.values()):  # gangs come and go while this awaits
            try:
                infos = await asyncio.gather(*[w.info.remote() for w in g.workers]) if g.ready else []
            except RayError:  # a rank just died: the gang is being dropped
                continue
            members = [j for j, r in self.running.items() if r.gang is g]
            out.append({"gang": g.id, "shape": g.shape.__dict__, "busy": g.busy, "job": g.job_id, "jobs": members,
                        "ranks": [asdict(i) for i in infos]})
        return out

    async def report_epoch(self, job_id: str, epoch: int, metrics: EpochMetrics) -> None:
        if self.store.job(job_id) is not None:
            self.store.record_epoch(job_id, epoch, metrics)
        if job_id in self.running:
            self.live.setdefault(job_id, {})["val_acc"] = metrics.get("val_acc")

    async def report_progress(self, job_ids: list[str], epoch: int, step: int, num_steps: int) -> None:
        """Rank 0 of a pack is at `step` of `num_steps` in `epoch` (throttled there): kept in memory for `status`."""
        for job_id in job_ids:
            if job_id in self.running:
                self.live.setdefault(job_id, {}).update(epoch=epoch, step=step, steps=num_steps)

    async def report_note(self, job_ids: list[str], attempt: int, text: str) -> None:
        """A rank of a pack says something about its run that changes no state (a checkpoint it could not write, and
        when it writes them again): a note in each member's log, the latest shown by `status`."""
        for job_id in job_ids:
            if self.store.add_note(job_id, text, attempt=attempt):  # False: unknown job, or a stale attempt
                self.log.warning("job_note", job_id=job_id, attempt=attempt, note=text)

    async def report_result(self, job_id: str, attempt: int, result: JobResult) -> None:
        """A pack member ended while its pack trains on (diverged, failed by a plugin, cancelled): record it now."""
        running = self.running.get(job_id)
        if running is not None and running.attempts.get(job_id) == attempt:
            self._record(job_id, result, attempt)

    async def shutdown(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
        await asyncio.gather(*[self._close(g, "shutdown") for g in list(self.gangs.values()) if not g.busy])
        for g in list(self.gangs.values()):
            self._drop(g)
        await asyncio.gather(*self._releasing)
        self.store.close()  # folds the write-ahead log into the file: after a clean stop, store.db holds it all

    # -- scheduling -----------------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await self._schedule()
                self._release_idle()
            except Exception as e:  # the loop must survive anything one job or gang does
                self.log.error("schedule_failed", error=f"{type(e).__name__}: {e}")
            # type-check: _ensure_loop() made the event before any call gets here
            self._wake.clear()  # type: ignore[union-attr]
            with contextlib.suppress(asyncio.TimeoutError):
                # type-check: _ensure_loop() made the event before any call gets here
                await asyncio.wait_for(self._wake.wait(), timeout=_TICK_S * 10)  # type: ignore[union-attr]

    def _scaling(self, shape_json: str) -> dict:
        scaling = self._scalings.get(shape_json)
        if scaling is None:
            scaling = self._scalings[shape_json] = json.loads(shape_json)
        return scaling

    async def _schedule(self) -> None:
        """One tick: gather the resources, the queue (grouped into packs) and the gangs; plan; apply the plan."""
        if not self.store.queued(limit=1):
            return
        # Gangs only start forming in this method, so what they reserve can only shrink while Ray answers.
        pending = self.pending
        total, available = await _cluster_resources()
        # Read after the await, and nothing awaited from here on: a job cancelled meanwhile is not started.
        queued = self.store.queued()
        if not queued:
            return
        free = available - pending
        packs = self._packs(queued, total)
        gangs = [GangView(g.id, g.shape, g.ready, g.busy, g.idle_since) for g in self.gangs.values()]
        queued_ids = {r["id"] for r in queued}
        for action in plan([p.queued() for p in packs.values()], gangs, Cluster(total, free)):
            if isinstance(action, Fail):
                self.store.finish(action.job_id, JobResult.failed(action.reason))
            elif isinstance(action, Release):
                self._release(self.gangs[action.gang_id], action.reason)
            else:
                self._start(packs[action.head], action.gang, queued_ids)

    def _start(self, pack: _Pack, on: str | NewGang, queued_ids: set[str]) -> None:
        """Start a planned pack on an idle gang (its id) or a new one: its jobs are placing from now on."""
        if isinstance(on, NewGang):
            gang = Gang.create(on.shape, strategy=self.strategy, plugin_dirs=self.plugin_dirs)
            self.gangs[gang.id] = gang
        else:
            gang = self.gangs[on]
        if pack.pack_id:
            # The pack it was part of when that lost its gang: the same members, to resume from its checkpoints.
            members = self.store.pack_members(pack.pack_id) or [pack.head]
            running = RunningPack(pack.pack_id, gang, members, [j for j in members if j in queued_ids], {})
        else:
            members = list(pack.job_ids)
            pid = pack_id(members)
            self.store.start_pack(pid, members)
            running = RunningPack(pid, gang, members, list(members), {})
        gang.busy = True
        for job_id in running.active:
            self.store.transition(job_id, JobState.PLACING)
            self.running[job_id] = running
        asyncio.get_running_loop().create_task(self._run(running))

    def _packs(self, queued, total: Resources) -> dict[str, _Pack]:
        """The queue as packs, by head, in queue order: a job queued with a pack id rejoins its pack (the pack it
        was part of when that lost its gang); the others form packs of the first jobs, in queue order, of the same
        pack key, shape and priority, up to the pack size (l2cluster.packing). What plan() starts is formed."""
        shape_of = lambda r: GangShape.of_scaling(self._scaling(r["shape_json"]), total.gpus)  # noqa: E731
        key = lambda r: None if r["pack_key"] is None else (r["pack_key"], r["shape_json"], r["priority"])  # noqa: E731
        same = Counter(key(r) for r in queued if not r["pack_id"])

        def size(head) -> int:
            if head["pack_id"]:
                return len(queued)  # the whole pack rejoins
            limit = self._max_members(head, shape_of(head))
            if limit > 1:
                # Spread a short queue over every gang the cluster can hold at once: one big pack on one gang while
                # the others idle would make a sweep slower than no packing at all. Counted over the whole queue of
                # this tick, so that every pack formed in it gets the same size.
                limit = min(limit, -(-same[key(head)] // total.count(Resources.of(shape_of(head)))))
            return limit

        packs: dict[str, _Pack] = {}
        for rows in group_into_packs(queued, size, lambda r: ("pack", r["pack_id"]) if r["pack_id"] else key(r)):
            head = rows[0]
            packs[head["id"]] = _Pack(head["id"], shape_of(head), self._scaling(head["shape_json"])["use_gpu"] is True,
                                      head["pack_id"], [r["id"] for r in rows])
        return packs

    def _max_members(self, head, shape: GangShape) -> int:
        if head["pack_key"] is None:
            return 1
        gpu_bytes = None
        if shape.gpus_per_worker:
            gpu_bytes = int(self.gpu_bytes.get(shape, ASSUMED_GPU_BYTES) * min(1.0, shape.gpus_per_worker))
        return max_members(json.loads(head["config_json"]), gpu_bytes=gpu_bytes, cap=self.max_pack)

    async def _run(self, running: RunningPack) -> None:
        gang = running.gang
        log = self.log.bind(pack=running.id[:8], members=len(running.members), gang=gang.id)
        if gang.ready and not await self._healthy(gang, log):
            # It died while idle: a new gang is formed on the next tick, and the job is not charged an attempt.
            self._drop(gang)
            self._end_run(running)
            for job_id in running.active:
                self.store.transition(job_id, JobState.QUEUED, detail=f"its idle gang {gang.id} had died; re-queued "
                                      "on a new gang (no attempt counted: it had not started training)")
            return
        try:
            if not gang.ready:
                shape = gang.shape
                self.pending += Resources.of(shape)  # reserved by its placement group only once that is created
                try:
                    running.stage = "loading MNIST"
                    mnist = await asyncio.to_thread(self._mnist)
                    running.stage = "forming a gang"
                    await gang.form(mnist, self.form_timeout_s)
                finally:
                    self.pending -= Resources.of(shape)
                log.info("gang_formed", pids=[i.pid for i in gang.infos], node=gang.node)
                sizes = [i.gpu_bytes for i in gang.infos if i.gpu_bytes]
                if sizes:
                    self.gpu_bytes[shape] = min(sizes)
        except (RayError, asyncio.TimeoutError, OSError) as e:
            log.warning("gang_failed", error=f"{type(e).__name__}: {e}")
            self._drop(gang)
            self._end_run(running)
            for job_id in running.active:
                self._placement_failed(job_id, f"{type(e).__name__}: {e}")
            return
        except DataError as e:  # MNIST is missing or corrupt here: fail the job, keep serving (fixed files load)
            log.error("data_unusable", error=str(e))
            self._drop(gang)
            self._end_run(running)
            for job_id in running.active:
                self.store.finish(job_id, JobResult.failed(f"the coordinator cannot load MNIST: {e}"))
            return
        size = len(running.members)
        for job_id in running.active:  # an attempt is counted here: the job starts training
            self.store.transition(job_id, JobState.RUNNING, node=gang.node,
                                  detail=f"in pack {running.id[:8]} with {size - 1} other job(s)" if size > 1 else None)
            # type-check: a job the store holds: its row is never None here
            running.attempts[job_id] = self.store.job(job_id)["attempts"]  # type: ignore[index]
            self.placement_failures.pop(job_id, None)
        attempt = max(running.attempts.values())
        log = log.bind(attempt=attempt)
        gang.job_id = running.id
        running.stage = "training"
        if running.cancel_all:
            for w in gang.workers:
                w.cancel.remote()
        for job_id in running.cancelled:
            for w in gang.workers:
                w.cancel.remote(job_id)
        me = ray.get_runtime_context().current_actor
        rows = {j: self.store.job(j) for j in running.members}
        # type-check: a job the store holds: its row is never None here
        members = [(j, json.loads(rows[j]["config_json"])) for j in running.members]  # type: ignore[index]
        done = [j for j in running.members if j not in running.active]
        try:
            refs = [w.run.remote(running.id, members, attempt, me, self.checkpoint_dir, done) for w in gang.workers]
            outs, stuck = await _await_ranks(refs)
            # A crash explains the run best; else rank 0's results (every rank computes the same ones).
            out = next((o for o in outs if o is not None and o.crashed), None) or outs[0] or RankOutcome(
                error="rank 0 returned no result")
            for job_id in running.active:
                if job_id in out.results:
                    self._record(job_id, out.results[job_id], running.attempts[job_id])
                elif not self._terminal(job_id):
                    # A crash (or a rank with no result) fails the members it did not report, as complete records.
                    self.store.finish(job_id, JobResult.failed(out.error or "the run returned no result"),
                                      attempt=running.attempts[job_id])
            # type-check: a running job's row exists
            log.info("pack_finished", outcomes={j: self.store.job(j)["state"] for j in running.active},  # type: ignore[index]
                     resumed_from_epoch=out.resumed_from_epoch, split=out.split)
            if stuck or (gang.shape.num_workers > 1 and any(o is not None and o.crashed for o in outs)):
                # A rank crashed outside the collectives' lockstep: its process group cannot be trusted.
                log.warning("gang_dropped", reason="a rank crashed", stuck_ranks=stuck)
                self._drop(gang)
            else:
                gang.busy, gang.idle_since, gang.job_id = False, time.time(), None
        except RayError as e:  # a rank (or its node) died, or Ray failed the call: the gang is gone
            what = "a rank of its gang died" if isinstance(e, RayActorError) else "the gang failed"
            log.warning("gang_lost", error=str(e))
            self._drop(gang)
            for job_id in running.active:
                if self._terminal(job_id):
                    continue  # it ended (and was recorded) before the gang was lost
                if running.cancel_all or job_id in running.cancelled:
                    self.store.finish(job_id, JobResult(Outcome.CANCELLED, error=f"cancelled; {what}"))
                else:
                    self._retry_or_fail(job_id, f"{what}: {e}")  # whole: Ray's errors say why on later lines
        finally:
            self._end_run(running)

    def _record(self, job_id: str, result: JobResult, attempt: int) -> None:
        """Store one member's result, once (a member that ended early was reported during the run already)."""
        if self._terminal(job_id):
            return
        resumed = result.resumed_from_epoch
        self.store.finish(job_id, result, attempt=attempt,
                          detail=f"resumed from the checkpoint of epoch {resumed}" if resumed else None)

    def _terminal(self, job_id: str) -> bool:
        # type-check: a job the store holds: its row is never None here
        return JobState(self.store.job(job_id)["state"]).is_terminal  # type: ignore[index]

    def _end_run(self, running: RunningPack) -> None:
        """The pack's run is over: forget it and delete the checkpoints of whatever has ended for good."""
        for job_id in running.active:
            if self.running.get(job_id) is running:
                self.running.pop(job_id)
                self.live.pop(job_id, None)
        ended = [j for j in running.members if self._terminal(j)]
        for job_id in ended:  # a member that trained alone after its pack split kept its own checkpoints
            remove_job(self.checkpoint_dir, job_id)
        if len(ended) == len(running.members):
            remove_job(self.checkpoint_dir, running.id)
        # type-check: _ensure_loop() made the event before any call gets here
        self._wake.set()  # type: ignore[union-attr]

    async def _healthy(self, gang: Gang, log) -> bool:
        """Whether every rank of an idle gang still answers (a rank may have died while the gang idled)."""
        try:
            await asyncio.wait_for(asyncio.gather(*[w.info.remote() for w in gang.workers]), _HEALTH_TIMEOUT_S)
            return True
        except (RayError, asyncio.TimeoutError) as e:
            log.warning("idle_gang_dead", error=f"{type(e).__name__}: {e}")
            return False

    def _placement_failed(self, job_id: str, why: str) -> None:
        """A gang failed to form for this job: back to the queue without an attempt counted (it never trained),
        or failed after max_attempts such failures in a row."""
        failures = self.placement_failures[job_id] = self.placement_failures.get(job_id, 0) + 1
        # type-check: a job the store holds: its row is never None here
        if failures < json.loads(self.store.job(job_id)["config_json"]).get("max_attempts", 3):  # type: ignore[index]
            self.store.transition(job_id, JobState.QUEUED, detail=f"placement failed ({why}); re-queued (no attempt "
                                  "counted: it had not started training)")
        else:
            self.placement_failures.pop(job_id)
            self.store.finish(job_id, JobResult.failed(f"placement failed {failures} times in a row; the last: {why}"))

    def _retry_or_fail(self, job_id: str, why: str) -> None:
        """A job lost its gang (or its coordinator): back to the queue, or failed once max_attempts are spent."""
        row = self.store.job(job_id)
        # type-check: a job the store holds: its row is never None here
        max_attempts = json.loads(row["config_json"]).get("max_attempts", 3)  # type: ignore[index]
        # type-check: a job the store holds: its row is never None here
        if row["attempts"] < max_attempts:  # type: ignore[index]
            self.store.transition(job_id, JobState.QUEUED,
                                  # type-check: a job the store holds: its row is never None here
                                  detail=f"attempt {row['attempts']} lost ({why}); re-queued to resume from its "  # type: ignore[index]
                                         "last checkpoint")
        else:
            # type-check: a job the store holds: its row is never None here
            gave_up = f"gave up after {row['attempts']} attempt(s) (max_attempts); the last: {why}"  # type: ignore[index]
            self.store.finish(job_id, JobResult.failed(gave_up))
            remove_job(self.checkpoint_dir, job_id)

    def _mnist(self):
        with self._mnist_lock:
            return self._load_mnist()

    def _load_mnist(self):
        if self.mnist_ref is None:
            from l2cluster.training.data import load_mnist

            m = load_mnist(self.data_dir)
            # Put once; every rank on a node then reads the same shared-memory copy (numpy is zero-copy).
            self.mnist_ref = ray.put({k: getattr(m, k).numpy() for k in
                                      ("train_images", "train_labels", "test_images", "test_labels")})
        return self.mnist_ref

    def _release_idle(self) -> None:
        now = time.time()
        for g in list(self.gangs.values()):
            if g.ready and not g.busy and now - g.idle_since > self.idle_release_s:
                self._release(g, f"idle for {now - g.idle_since:.0f} s")

    def _release(self, gang: Gang, reason: str) -> None:
        """Release an idle gang in the background: its ranks destroy their process groups, then it goes."""
        self.gangs.pop(gang.id, None)
        asyncio.get_running_loop().create_task(self._close(gang, reason))

    async def _close(self, gang: Gang, reason: str) -> None:
        self.gangs.pop(gang.id, None)
        try:
            destroyed = await gang.close()
            self.log.info("gang_released", gang=gang.id, reason=reason, process_groups_destroyed=destroyed)
        except Exception as e:  # already gone
            self.log.warning("gang_release_failed", gang=gang.id, error=str(e)[:200])
        if self._wake is not None:
            self._wake.set()  # its resources are free now

    def _drop(self, gang: Gang) -> None:
        """Forget a gang and release it (kill its actors, remove its placement group) in a thread: those are
        calls to Ray's control store, kept off the event loop. shutdown() waits for them."""
        self.gangs.pop(gang.id, None)

        def release():
            try:
                gang.release()
            except Exception as e:  # already gone
                self.log.warning("gang_release_failed", gang=gang.id, error=str(e)[:200])

        task = asyncio.get_running_loop().create_task(asyncio.to_thread(release))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    def _restart_command(self) -> str:
        """The commands that restart this daemon with the same store and plugin directories."""
        options = [f"--store {shlex.quote(str(self.store.path))}"]
        options += [f"--plugin-dir {shlex.quote(d)}" for d in self.plugin_dirs]
        return (f"l2cluster daemon stop && l2cluster daemon start {' '.join(options)} (with the other options it "
                "was started with; add --address for a daemon on an existing Ray cluster)")


async def _cluster_resources() -> tuple[Resources, Resources]:
    """The cluster's total and available resources. Each is a call to Ray's control store that blocks until it
    answers: made in a worker thread, so the event loop answers other calls meanwhile."""
    total, available = await asyncio.to_thread(lambda: (ray.cluster_resources(), ray.available_resources()))
    return Resources.of_ray(total), Resources.of_ray(available)


async def _await_ranks(refs: list) -> tuple[list[RankOutcome | None], int]:
    """Wait for every rank's result; raises a RayError when a rank dies. When one rank crashes (RankOutcome.crashed)
    while the others still run, they may wait forever in a collective: give them a grace period, then
    return without them (their entries None) and say how many were stuck."""
    futures = [asyncio.ensure_future(r) for r in refs]
    pending, crashed_at = set(futures), None
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=None if crashed_at is None else _CRASH_GRACE_S,
                                               return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                if f.result().crashed and crashed_at is None:  # .result() raises a dead rank's error
                    crashed_at = time.monotonic()
            if pending and crashed_at is not None and time.monotonic() - crashed_at >= _CRASH_GRACE_S:
                break
    finally:
        for f in pending:
            f.cancel()
    return [f.result() if f.done() and not f.cancelled() else None for f in futures], len(pending)
