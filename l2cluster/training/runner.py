"""The job runner: trains one pack of jobs (K ≥ 1 members) and turns the trainer's results into job results.

The one function both paths use: the in-process `train` command and every rank of a daemon's gang. It builds
the stacked trainer, resumes from the pack's newest checkpoint every rank has, checkpoints after every epoch,
reports each member's epochs and — as soon as it is known — its result, and lets single members be cancelled.

A plugin hook that raises fails a whole stack (the trainer cannot tell which member's settings made it raise).
A pack then splits: every member whose outcome is not yet known trains again alone, from its own checkpoints,
so the member whose plugin fails ends alone and the others' results equal those of solo runs.

A checkpoint the OS refuses to write (disk full, I/O error, read-only) does not stop the pack: it trains on without
that checkpoint, tries again after the next epoch, and says so through `on_note` (the first failure, and the first
write that succeeds again). An epoch some rank could not write is a checkpoint on no rank.

Plain PyTorch: it never imports ray (the gang passes callbacks that talk to the coordinator).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from l2cluster.ids import pack_id as make_pack_id
from l2cluster.plugin import HookError
from l2cluster.records import EpochMetrics, JobResult
from l2cluster.spec.config import TrainConfig
from l2cluster.states import Outcome
from l2cluster.training.checkpoint import CheckpointWriteError, JobCheckpoints
from l2cluster.training.trainer import RunResult, Trainer


@dataclass
class Member:
    """One job of a pack: its id and validated TrainConfig."""

    job_id: str
    config: TrainConfig


@dataclass
class PackRun:
    """What running a pack produced: a result per member job, and the epoch the pack resumed from."""

    results: dict[str, JobResult] = field(default_factory=dict)
    resumed_from_epoch: int = 0
    split: bool = False  # a hook raised in the pack: the members trained again alone


def job_result(result: RunResult, trainer: Trainer, k: int, resumed: int) -> JobResult:
    """The record of one member's run that the store keeps (`Store.finish`): the trainer's result of an ended model,
    with the sum of its parameters (a cheap fingerprint for equality checks) among its final metrics."""
    final = dict(result.final)
    final["param_sum"] = float(sum(p.detach()[k].double().sum() for p in trainer.params.values()))
    final["cuda_graphs"] = bool(trainer.graphs)
    if trainer.device.type == "cuda" and not trainer.graphs:  # said in `l2cluster logs JOB`
        final["eager_reason"] = _eager_reason(trainer)
    return JobResult(Outcome(result.outcome), final, error=result.error, diverged_epoch=result.diverged_epoch,
                     epochs=list(result.epochs), resumed_from_epoch=resumed)


def run_pack(
    members: Sequence[Member],
    splits,
    registry,
    *,
    device: torch.device,
    checkpoint_dir: str | None = None,
    rank: int = 0,
    world: int = 1,
    done: Collection[str] = (),
    on_epoch: Callable[[str, int, EpochMetrics], None] | None = None,
    on_result: Callable[[str, JobResult], None] | None = None,
    cancelled: Callable[[], bool | Collection[str]] | None = None,
    on_progress: Callable[[list[str], int, int, int], None] | None = None,
    on_note: Callable[[list[str], str], None] | None = None,
    log=None,
) -> PackRun:
    """Train `members` as one pack on this rank; returns every member's result.

    `done`: members whose outcome is already recorded (a resumed pack carries them along, their results
    unused). `on_epoch(job_id, epoch, metrics)` and `on_result(job_id, result)` are called on rank 0 only.
    `cancelled()` is asked before every step: True stops the pack, a collection of job ids stops those members.
    `on_progress(job_ids, epoch, step, num_steps)` is called after every step on rank 0 (throttle it there).
    With `checkpoint_dir` every rank saves the pack's state after each epoch but the last under the pack's id,
    and a later run of the same members resumes from the newest epoch every rank has. `on_note(job_ids, text)` is
    called on whichever rank could not write its checkpoint (and when it writes one again), for the members
    still training."""
    ids = [m.job_id for m in members]
    run = _train(members, splits, registry, device=device, checkpoint_dir=checkpoint_dir, rank=rank, world=world,
                 done=done, on_epoch=on_epoch, on_result=on_result, cancelled=cancelled, on_progress=on_progress,
                 on_note=on_note, log=log)
    if run.split:
        for m in members:
            if m.job_id in run.results or m.job_id in done:
                continue
            if log is not None:
                log.info("pack_split_member", job_id=m.job_id, pack=make_pack_id(ids)[:8])
            solo = _train([m], splits, registry, device=device, checkpoint_dir=checkpoint_dir, rank=rank,
                          world=world, done=(), on_epoch=on_epoch, on_result=on_result, cancelled=cancelled,
                          on_progress=on_progress, on_note=on_note, log=log)
            run.results.update(solo.results)
    return run


def _train(members, splits, registry, *, device, checkpoint_dir, rank, world, done, on_epoch, on_result, cancelled,
           on_progress, on_note, log) -> PackRun:
    ids = [m.job_id for m in members]
    configs = [m.config for m in members]
    pid = make_pack_id(ids)
    epochs = configs[0].epochs
    try:
        trainer = Trainer(configs, splits, registry, device=device)
    except HookError as e:  # a plugin's init_state raised or returned something unusable: nothing trained
        if len(members) > 1:  # which member's settings did it is unknown: each trains (and fails) alone
            return PackRun(split=True)
        failed = JobResult.failed(str(e))
        if rank == 0 and on_result is not None:
            on_result(ids[0], failed)
        return PackRun(results={ids[0]: failed})
    if log is not None and device.type == "cuda" and not trainer.graphs:
        log.info("cuda_graphs_off", pack=pid[:8], reason=_eager_reason(trainer))
    ckpt = JobCheckpoints(checkpoint_dir, pid, rank) if checkpoint_dir else None
    resumed = _resume(trainer, ckpt, device, world) if ckpt is not None else 0
    if resumed and log is not None:
        log.info("pack_resumed" if len(members) > 1 else "job_resumed", epoch=resumed, pack=pid[:8])
    skip = [k for k, j in enumerate(ids) if j in done]
    if skip and not trainer.stop_models(skip):
        return PackRun(resumed_from_epoch=resumed)  # nothing left to train
    reported = set(done)
    run = PackRun(resumed_from_epoch=resumed)

    def note(text: str) -> None:  # about the members still training
        if on_note is not None:
            on_note([j for k, j in enumerate(ids) if trainer.alive[k] and j not in done], text)

    # type-check: only built where a checkpoint directory was given
    saver = _EpochCheckpoints(ckpt, device, world, log, note)  # type: ignore[arg-type]

    def report_ended() -> None:
        # Members that ended early (diverged, failed by a plugin's NaN, cancelled) are reported at once: their
        # job is over while the others go on.
        for k, r in enumerate(trainer.results):
            if r.outcome is not None and ids[k] not in reported:  # None: still training
                reported.add(ids[k])
                if not r.final:
                    trainer.finalize(k)
                run.results[ids[k]] = res = job_result(r, trainer, k, resumed)
                if rank == 0 and on_result is not None:
                    on_result(ids[k], res)

    def epoch_done(epoch: int, metrics: list[dict]) -> None:
        if ckpt is not None and epoch < epochs and any(metrics):
            saver.save(epoch, trainer.state_dict())
        if rank == 0 and on_epoch is not None:
            for k, m in enumerate(metrics):
                if m and ids[k] not in done:
                    on_epoch(ids[k], epoch, m)
        report_ended()

    def should_stop() -> bool | list[int]:
        asked = cancelled() if cancelled is not None else False
        if not asked and world == 1:
            return False  # the common case, every step: nothing to scan
        stop = [k for k, j in enumerate(ids) if asked is True or (asked and j in asked)]
        if world > 1:  # every rank must stop the same members at the same step, or the others hang
            flags = torch.zeros(len(ids), device=device)
            flags[stop] = 1.0
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop = flags.nonzero().flatten().tolist()
        if len(stop) == len(ids):
            return True
        return [k for k in stop if trainer.alive[k]]

    step_done = None
    if rank == 0 and on_progress is not None:
        training = [j for j in ids if j not in done]

        def step_done(epoch: int, step: int, num_steps: int) -> None:
            on_progress(training, epoch, step, num_steps)

    # type-check: a truthy list means stop, as a bool would
    results = trainer.fit(on_epoch=epoch_done, should_stop=should_stop, on_step=step_done)  # type: ignore[arg-type]
    if trainer.hook_error is not None and len(members) > 1:
        # Which member's settings made the hook raise is unknown: every member not yet ended trains alone.
        run.split = True
        if ckpt is not None:
            ckpt.remove()
        return run
    report_ended()
    for k, j in enumerate(ids):
        if j not in run.results and j not in done:
            run.results[j] = job_result(results[k], trainer, k, resumed)
    if ckpt is not None:  # the run is over: every outcome is final, nothing will resume it
        ckpt.remove()
    return run


class _EpochCheckpoints:
    """This rank's checkpoint after each epoch, where a write the OS refuses is logged and noted, never fatal.

    Noted once when writes start failing and once when one succeeds again (a full disk fails every epoch; the log
    has each). With several ranks an epoch counts only if every rank wrote it: the others delete theirs, so
    each rank keeps the newest epoch they all have, which is where a retried attempt resumes."""

    def __init__(self, ckpt: JobCheckpoints, device, world: int, log, note: Callable[[str], None]):
        self.ckpt, self.device, self.world, self.log, self.note = ckpt, device, world, log, note
        self.failing = False

    def save(self, epoch: int, state: dict) -> None:
        try:
            path = self.ckpt.save(epoch, state)
        except CheckpointWriteError as e:
            written = False
            if self.log is not None:
                self.log.warning("checkpoint_not_written", epoch=epoch, path=e.filename,
                                 error=f"[Errno {e.errno}] {e.strerror}")
            if not self.failing:
                self.note(f"checkpoint of epoch {epoch} not written ({e}); training goes on without checkpoints, "
                          "trying again after every epoch")
            self.failing = True
        else:
            written = True
            if self.failing:
                if self.log is not None:
                    self.log.info("checkpoint_written_again", epoch=epoch, path=str(path))
                self.note(f"checkpoints written again from epoch {epoch} ({path})")
            self.failing = False
        if self.world > 1:  # every rank's write is over before the epoch counts as done (a barrier that also tells)
            every = torch.tensor([int(written)], device=self.device)
            dist.all_reduce(every, op=dist.ReduceOp.MIN)
            if written and not every.item():
                self.ckpt.discard(epoch)


def _eager_reason(trainer: Trainer) -> str:
    """Why a run on a GPU trained without CUDA graphs (same results, slower)."""
    return getattr(trainer, "graphs_off_reason", None) or trainer.graph_error or "not possible for this stack"


def _resume(trainer: Trainer, ckpt: JobCheckpoints, device, world: int) -> int:
    """Load the newest checkpoint every rank has (0: none, start from scratch); ranks agree on the epoch."""
    epochs = ckpt.epochs()
    epoch = epochs[-1] if epochs else 0
    # Each round every rank offers its newest epoch at most the agreed one, until all have it. The loop ends on
    # values every rank shares (after the all_reduce), so all ranks run the same collectives.
    while world > 1:
        agreed = torch.tensor([epoch], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        epoch = int(agreed.item())
        if not epoch:
            break
        have = torch.tensor([int(epoch in epochs)], device=device)
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if have.item():
            break
        epoch = max((e for e in epochs if e < epoch), default=0)
    if epoch:
        trainer.load_state_dict(ckpt.load(epoch))
    return epoch

