"""Live progress of an experiment for `submit --wait` and `run`: counts by state, each running job's epoch, an ETA.

`Progress` turns successive `status` snapshots into numbers (pure, testable); `ProgressDisplay` draws them: on a
terminal a block redrawn in place, elsewhere (CI logs, pipes) one plain line when the counts change or every
`heartbeat_s`, never faster than every `min_interval_s`.

The ETA is the remaining epochs (unfinished jobs' epochs still to run) over the epoch throughput measured
since the wait began; finished jobs count the epochs they ran.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import TextIO

from l2cluster.aggregate import TERMINAL_STATES, settings_text

# Display order; placing counts as starting.
_STATES = ("queued", "placing", "running", "succeeded", "diverged", "failed", "cancelled")
_MAX_RUNNING_SHOWN = 8


@dataclass
class Snapshot:
    at: float
    counts: dict[str, int]
    num_jobs: int
    epochs_done: int
    epochs_total: int
    eta_s: float | None
    running: list[dict] = field(default_factory=list)  # job, name, seed, epoch, epochs

    @property
    def finished(self) -> bool:
        return sum(self.counts.get(s, 0) for s in TERMINAL_STATES) == self.num_jobs


class Progress:
    """Epoch bookkeeping over `status` snapshots. `epochs_of` maps job id → the job's configured epochs."""

    def __init__(self, epochs_of: dict[str, int]):
        self.epochs_of = epochs_of
        self._start: tuple[float, int] | None = None

    def update(self, jobs: list[dict], now: float | None = None) -> Snapshot:
        now = time.time() if now is None else now
        counts: dict[str, int] = {}
        done = total = 0
        running = []
        for j in jobs:
            state = j["state"]
            counts[state] = counts.get(state, 0) + 1
            epochs = self.epochs_of.get(j["job"], j["epoch"])
            ran = min(j["epoch"], epochs)
            if state == "succeeded":
                done, total = done + epochs, total + epochs
            elif state in TERMINAL_STATES:  # diverged, failed, cancelled: no more epochs to come
                done, total = done + ran, total + ran
            else:
                done, total = done + ran, total + epochs
            if state in ("placing", "running"):
                name = " ".join(x for x in (j.get("label"), settings_text(j.get("overrides") or {})) if x and x != "-")
                running.append({"job": j["job"], "name": name or "-", "seed": j["seed"], "state": state,
                                "epoch": ran, "epochs": epochs})
        if self._start is None:
            self._start = (now, done)
        t0, done0 = self._start
        rate = (done - done0) / (now - t0) if now > t0 else 0.0
        eta = (total - done) / rate if rate > 0 else (0.0 if total == done else None)
        return Snapshot(now, counts, len(jobs), done, total, eta, running)


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
    parts = [f"{finished}/{snap.num_jobs} done", f"{c.get('running', 0) + c.get('placing', 0)} running",
             f"{c.get('queued', 0)} queued"]
    parts += [f"{c[s]} {s}" for s in ("succeeded", "failed", "diverged", "cancelled") if c.get(s)]
    return " · ".join(parts)


def summary_line(experiment: str, snap: Snapshot) -> str:
    pct = 100.0 * snap.epochs_done / snap.epochs_total if snap.epochs_total else 100.0
    eta = "" if snap.finished else f", ETA {format_duration(snap.eta_s)}"
    return f"{experiment}: {counts_text(snap)} | epochs {snap.epochs_done}/{snap.epochs_total} ({pct:.0f}%){eta}"


def running_text(r: dict) -> str:
    where = "starting" if r["state"] == "placing" else f"epoch {r['epoch']}/{r['epochs']}"
    return f"{r['job'][:8]} {r['name']} seed {r['seed']}: {where}"


class ProgressDisplay:
    """Draws snapshots to a stream: redrawn in place on a terminal, plain lines otherwise."""

    def __init__(self, experiment: str, stream: TextIO, *, tty: bool | None = None, min_interval_s: float = 5.0,
                 heartbeat_s: float = 30.0):
        self.experiment, self.stream = experiment, stream
        # A dumb terminal (an editor's shell, some CI runners) cannot move the cursor: plain lines there too.
        self.tty = stream.isatty() and os.environ.get("TERM") != "dumb" if tty is None else tty
        self.min_interval_s, self.heartbeat_s = min_interval_s, heartbeat_s
        self._drawn_lines = 0
        self._last_at: float | None = None
        self._last_counts: dict | None = None

    def show(self, snap: Snapshot) -> None:
        if self.tty:
            self._redraw(snap)
            return
        changed = snap.counts != self._last_counts
        if self._last_at is not None:
            elapsed = snap.at - self._last_at
            if snap.finished:
                due = changed  # the final counts, always, once
            else:
                due = elapsed >= self.min_interval_s if changed else elapsed >= self.heartbeat_s
            if not due:
                return
        self._last_at, self._last_counts = snap.at, snap.counts
        line = f"[{time.strftime('%H:%M:%S', time.localtime(snap.at))}] {summary_line(self.experiment, snap)}"
        if snap.running:
            shown = "; ".join(running_text(r) for r in snap.running[:_MAX_RUNNING_SHOWN])
            more = len(snap.running) - _MAX_RUNNING_SHOWN
            line += f" | {shown}" + (f"; +{more} more" if more > 0 else "")
        print(line, file=self.stream, flush=True)

    def _redraw(self, snap: Snapshot) -> None:
        width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
        lines = [summary_line(self.experiment, snap)]
        lines += ["  " + running_text(r) for r in snap.running[:_MAX_RUNNING_SHOWN]]
        if len(snap.running) > _MAX_RUNNING_SHOWN:
            lines.append(f"  +{len(snap.running) - _MAX_RUNNING_SHOWN} more running")
        # Back to the first line of the previous block and clear it; lines are cut to the width so none wraps.
        prefix = f"\x1b[{self._drawn_lines}F\x1b[J" if self._drawn_lines else ""
        self.stream.write(prefix + "".join(line[:width] + "\n" for line in lines))
        self.stream.flush()
        self._drawn_lines = len(lines)
