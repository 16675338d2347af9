"""Live progress of an experiment for `submit --wait`, `watch` and `run`, and final tables that fit the terminal.

`Progress` turns successive `status` snapshots into numbers (pure, testable); `ProgressDisplay` draws them: on a
terminal a bar and one line per running job, redrawn in place; elsewhere (CI logs, pipes) one plain line when the
counts change or the work done grew by 10 points (never faster than every `min_interval_s`), and every `heartbeat_s`.

Work is counted in epochs, with the epoch in progress counted by its steps: a running job's `status` entry
carries `live` = {"epoch" (in progress), "step", "steps", "val_acc", "stage"} from the coordinator's memory (rank 0
reports its step at most every 2 s). The ETA is the work still to do over the throughput measured since the wait
began; finished jobs count the epochs they ran.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from l2cluster.results.aggregate import settings_text
from l2cluster.states import TERMINAL_STATES, JobState

_MAX_RUNNING_SHOWN = 8
_BAR_WIDTH = 20
_MIN_ETA_WINDOW_S = 5.0
# What a placing job waits for (the coordinator's `stage`), said once each as it first happens.
_STAGE_MESSAGES = {"loading MNIST": "loading MNIST …",
                   "forming a gang": "forming gangs: starting the worker processes (each imports torch) …"}


@dataclass
class Snapshot:
    at: float
    counts: dict[str, int]
    num_jobs: int
    epochs_done: float  # the epochs in progress count by their steps
    epochs_total: int
    eta_s: float | None
    running: list[dict] = field(default_factory=list)  # job, name, seed, state, epoch, epochs, step, steps, val_acc
    stages: set[str] = field(default_factory=set)  # what placing jobs wait for ("loading MNIST", "forming a gang")

    @property
    def finished(self) -> bool:
        return sum(self.counts.get(s, 0) for s in TERMINAL_STATES) == self.num_jobs

    @property
    def fraction(self) -> float:
        return self.epochs_done / self.epochs_total if self.epochs_total else 1.0


def epochs_done(job: dict, epochs: int) -> float:
    """The epochs a job has run: its finished epochs, plus the steps of the one in progress as a fraction."""
    ran = min(job["epoch"], epochs)
    live = job.get("live") or {}
    if live.get("steps") and live.get("epoch") == ran + 1 and ran < epochs:
        return ran + min(live["step"], live["steps"]) / live["steps"]
    return float(ran)


class Progress:
    """Epoch bookkeeping over `status` snapshots. `epochs_of` maps job id → the job's configured epochs, `names`
    (optional) job id → its configuration's name (else the label and settings of its `status` entry)."""

    def __init__(self, epochs_of: dict[str, int], names: dict[str, str] | None = None):
        self.epochs_of, self.names = epochs_of, names or {}
        self._start: tuple[float, float] | None = None

    def update(self, jobs: list[dict], now: float | None = None) -> Snapshot:
        now = time.time() if now is None else now
        counts: dict[str, int] = {}
        done, total = 0.0, 0
        running, stages = [], set()
        for j in jobs:
            state = j["state"]
            counts[state] = counts.get(state, 0) + 1
            epochs = self.epochs_of.get(j["job"], j["epoch"])
            ran = min(j["epoch"], epochs)
            if state == JobState.SUCCEEDED:
                done, total = done + epochs, total + epochs
            elif state in TERMINAL_STATES:  # diverged, failed, cancelled: no more epochs to come
                done, total = done + ran, total + ran
            else:
                done, total = done + epochs_done(j, epochs), total + epochs
            if state in (JobState.PLACING, JobState.RUNNING):
                live = j.get("live") or {}
                if state == JobState.PLACING and live.get("stage"):
                    stages.add(live["stage"])
                in_epoch = live.get("steps") and live.get("epoch") == ran + 1 and ran < epochs
                name = self.names.get(j["job"]) or " ".join(
                    x for x in (j.get("label"), settings_text(j.get("overrides") or {})) if x and x != "-")
                running.append({"job": j["job"], "name": name or "-", "seed": j["seed"], "state": state,
                                "epoch": ran, "epochs": epochs, "step": live.get("step") if in_epoch else None,
                                "steps": live.get("steps") if in_epoch else None, "val_acc": live.get("val_acc"),
                                "stage": live.get("stage")})
        if self._start is None or done == self._start[1]:
            # The throughput is measured from the last snapshot before work moved: start-up (Ray, gangs) is not
            # training speed.
            self._start = (now, done)
        t0, done0 = self._start
        # Under _MIN_ETA_WINDOW_S of measured work the rate is noise (a first step report would say hours).
        rate = (done - done0) / (now - t0) if now - t0 >= _MIN_ETA_WINDOW_S else 0.0
        eta = (total - done) / rate if rate > 0 else (0.0 if total == done else None)
        return Snapshot(now, counts, len(jobs), done, total, eta, running, stages)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def counts_text(snap: Snapshot) -> str:
    c = snap.counts
    finished = sum(c.get(s, 0) for s in TERMINAL_STATES)
    parts = [f"{finished}/{snap.num_jobs} done", f"{c.get(JobState.RUNNING, 0) + c.get(JobState.PLACING, 0)} running",
             f"{c.get(JobState.QUEUED, 0)} queued"]
    parts += [f"{c[s]} {s}" for s in TERMINAL_STATES if c.get(s)]
    return " · ".join(parts)


def eta_text(snap: Snapshot) -> str:
    return "" if snap.finished else f", ETA {format_duration(snap.eta_s)}"


def epochs_text(snap: Snapshot) -> str:
    # "epochs 3.4/20": the epochs under way count by their steps; never "20/20" before the end.
    done = math.floor(snap.epochs_done * 10 + 1e-6) / 10
    return f"epochs {done:g}/{snap.epochs_total}"


def summary_line(experiment: str, snap: Snapshot) -> str:
    return f"{experiment}: {counts_text(snap)} | {epochs_text(snap)} ({100 * snap.fraction:.0f}%){eta_text(snap)}"


def bar(fraction: float, width: int = _BAR_WIDTH) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "█" * filled + "░" * (width - filled)


def running_text(r: dict) -> str:
    if r["state"] == JobState.PLACING:
        where = r.get("stage") if r.get("stage") in _STAGE_MESSAGES else "starting"
    elif r.get("steps"):  # inside an epoch: the one under way, and its step
        where = f"epoch {r['epoch'] + 1}/{r['epochs']} step {r['step']}/{r['steps']}"
    else:
        where = f"epoch {r['epoch']}/{r['epochs']}"
    val = "" if r.get("val_acc") is None else f", val acc {100 * r['val_acc']:.2f} %"
    return f"{r['job'][:8]} {r['name']} seed {r['seed']}: {where}{val}"


class ProgressDisplay:
    """Draws snapshots to a stream: redrawn in place on a terminal, plain lines otherwise."""

    def __init__(self, experiment: str, stream: TextIO, *, tty: bool | None = None, min_interval_s: float = 5.0,
                 heartbeat_s: float = 30.0, step_lines: float = 0.10):
        self.experiment, self.stream = experiment, stream
        # A dumb terminal (an editor's shell, some CI runners) cannot move the cursor: plain lines there too.
        self.tty = stream.isatty() and os.environ.get("TERM") != "dumb" if tty is None else tty
        self.min_interval_s, self.heartbeat_s, self.step_lines = min_interval_s, heartbeat_s, step_lines
        self._drawn_lines = 0
        self._last_at: float | None = None
        self._last_counts: dict | None = None
        self._last_fraction = 0.0
        self._said: set[str] = set()

    def say(self, message: str) -> None:
        """A one-off line (what is happening now) above the progress block."""
        if self.tty and self._drawn_lines:  # clear the block; the next show() draws it below the message
            self.stream.write(f"\x1b[{self._drawn_lines}F\x1b[J")
            self._drawn_lines = 0
        print(message, file=self.stream, flush=True)

    def show(self, snap: Snapshot) -> None:
        for stage, message in _STAGE_MESSAGES.items():
            if stage in snap.stages and stage not in self._said:
                self._said.add(stage)
                self.say(message)
        if self.tty:
            self._redraw(snap)
            return
        changed = snap.counts != self._last_counts or snap.fraction - self._last_fraction >= self.step_lines - 1e-9
        if self._last_at is not None:
            elapsed = snap.at - self._last_at
            if snap.finished:
                due = snap.counts != self._last_counts  # the final counts, always, once
            else:
                due = elapsed >= self.min_interval_s if changed else elapsed >= self.heartbeat_s
            if not due:
                return
        self._last_at, self._last_counts, self._last_fraction = snap.at, snap.counts, snap.fraction
        line = f"[{time.strftime('%H:%M:%S', time.localtime(snap.at))}] {summary_line(self.experiment, snap)}"
        if snap.running:
            shown = "; ".join(running_text(r) for r in snap.running[:_MAX_RUNNING_SHOWN])
            more = len(snap.running) - _MAX_RUNNING_SHOWN
            line += f" | {shown}" + (f"; +{more} more" if more > 0 else "")
        print(line, file=self.stream, flush=True)

    def _redraw(self, snap: Snapshot) -> None:
        width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
        lines = [f"{self.experiment} {bar(snap.fraction)} {100 * snap.fraction:.0f}%{eta_text(snap)}",
                 f"  {counts_text(snap)} | {epochs_text(snap)}"]
        lines += ["  " + running_text(r) for r in snap.running[:_MAX_RUNNING_SHOWN]]
        if len(snap.running) > _MAX_RUNNING_SHOWN:
            lines.append(f"  +{len(snap.running) - _MAX_RUNNING_SHOWN} more running")
        # Back to the first line of the previous block and clear it; lines are cut to the width so none wraps.
        prefix = f"\x1b[{self._drawn_lines}F\x1b[J" if self._drawn_lines else ""
        self.stream.write(prefix + "".join(line[:width] + "\n" for line in lines))
        self.stream.flush()
        self._drawn_lines = len(lines)


# -- final tables ------------------------------------------------------------------------------------------------
def fit_columns(header_in: Sequence[str], rows_in: Sequence[Sequence[str]], width: int, *, drop: Sequence[str] = (),
                cut: Sequence[tuple[str, int]] = ()) -> tuple[list[str], list[list[str]], list[str]]:
    """Make a table (columns joined by two spaces) at most `width` characters wide: first leave out the columns
    in `drop`, in that order, until it fits; then cut the cells of each (column, min_width) in `cut` to what is
    left (an ellipsis marks a cut cell), no narrower than min_width. Returns header, rows and the columns left out.
    A table that cannot fit keeps its minimum widths (a terminal narrower than that wraps it)."""
    header, rows = list(header_in), [list(r) for r in rows_in]
    dropped: list[str] = []

    def total() -> int:
        return sum(max(len(r[i]) for r in [header, *rows]) for i in range(len(header))) + 2 * (len(header) - 1)

    for name in drop:
        if total() <= width:
            break
        if name in header:
            i = header.index(name)
            header.pop(i)
            for r in rows:
                r.pop(i)
            dropped.append(name)
    for name, min_width in cut:
        excess = total() - width
        if excess <= 0 or name not in header:
            continue
        i = header.index(name)
        current = max(len(r[i]) for r in [header, *rows])
        target = max(min_width, current - excess)
        for r in [header, *rows]:
            if len(r[i]) > target:
                r[i] = r[i][: target - 1] + "…"
    return header, rows, dropped
