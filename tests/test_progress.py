"""Live progress: counts by state, running jobs' epochs and the ETA from status snapshots; plain periodic lines
off a terminal, a block redrawn in place on one."""

from __future__ import annotations

import io

from l2cluster.progress import Progress, ProgressDisplay, format_duration


def job(name, state, epoch, seed=0, label="l2", overrides=None):
    return {"job": name * 16, "state": state, "epoch": epoch, "seed": seed, "label": label,
            "overrides": overrides if overrides is not None else {"regularizers.l2.strength": 1e-4}}


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_counts_epochs_and_eta():
    progress = Progress({"a" * 16: 10, "b" * 16: 10, "c" * 16: 10, "d" * 16: 4})
    start = progress.update([job("a", "running", 2), job("b", "queued", 0), job("c", "placing", 0),
                             job("d", "diverged", 3)], now=100.0)
    assert start.counts == {"running": 1, "queued": 1, "placing": 1, "diverged": 1}
    # Done: 2 epochs of a, 3 of the diverged d (which will run no more); total 10 + 10 + 10 + 3.
    assert (start.epochs_done, start.epochs_total, start.eta_s, start.finished) == (5, 33, None, False)
    assert [(r["job"][:1], r["epoch"], r["epochs"], r["name"]) for r in start.running] == [
        ("a", 2, 10, "l2 strength=1e-4"), ("c", 0, 10, "l2 strength=1e-4")]
    later = progress.update([job("a", "succeeded", 10), job("b", "running", 1), job("c", "running", 3),
                             job("d", "diverged", 3)], now=120.0)
    # 17 epochs done, 12 more than at the start, in 20 s: 0.6 epochs/s; 16 to go → 26.7 s.
    assert (later.epochs_done, later.epochs_total) == (17, 33)
    assert later.eta_s == 16 / (12 / 20)
    done = progress.update([job("a", "succeeded", 10), job("b", "succeeded", 10), job("c", "failed", 5),
                            job("d", "diverged", 3)], now=130.0)
    assert done.finished and (done.epochs_done, done.epochs_total, done.eta_s) == (28, 28, 0.0)


def test_plain_lines_when_counts_change_or_periodically():
    progress = Progress({"a" * 16: 10, "b" * 16: 10})
    out = io.StringIO()
    display = ProgressDisplay("exp-1", out, min_interval_s=5, heartbeat_s=30)
    snaps = [
        (0, [job("a", "running", 1), job("b", "queued", 0)]),     # first: printed
        (2, [job("a", "running", 2), job("b", "queued", 0)]),     # nothing changed, no heartbeat yet
        (3, [job("a", "succeeded", 10), job("b", "running", 0)]),  # changed, but within 5 s of the last line
        (6, [job("a", "succeeded", 10), job("b", "running", 1)]),  # still changed since the last line: printed
        (20, [job("a", "succeeded", 10), job("b", "running", 5)]),  # same counts, 14 s: quiet
        (37, [job("a", "succeeded", 10), job("b", "running", 8)]),  # heartbeat after 30 s: printed
        (38, [job("a", "succeeded", 10), job("b", "succeeded", 10)]),  # finished: always printed
    ]
    for at, jobs in snaps:
        display.show(progress.update(jobs, now=at))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert "\x1b" not in out.getvalue()
    assert "exp-1: 0/2 done · 1 running · 1 queued | epochs 1/20 (5%), ETA ?" in lines[0]
    assert lines[0].endswith("| aaaaaaaa l2 strength=1e-4 seed 0: epoch 1/10")
    assert "1/2 done · 1 running · 0 queued · 1 succeeded | epochs 11/20 (55%), ETA 5s" in lines[1]
    assert lines[2].endswith("bbbbbbbb l2 strength=1e-4 seed 0: epoch 8/10")
    assert "2/2 done · 0 running · 0 queued · 2 succeeded | epochs 20/20 (100%)" in lines[3]
    assert "ETA" not in lines[3]


def test_a_terminal_gets_a_block_redrawn_in_place(monkeypatch):
    monkeypatch.setenv("TERM", "dumb")
    assert not ProgressDisplay("exp-1", Terminal()).tty  # cannot move the cursor: plain lines
    monkeypatch.setenv("TERM", "xterm-256color")
    progress = Progress({c * 16: 3 for c in "abc"})
    term = Terminal()
    display = ProgressDisplay("exp-1", term)
    assert display.tty
    display.show(progress.update([job("a", "running", 1), job("b", "running", 2, seed=1), job("c", "queued", 0)],
                                 now=0))
    first = term.getvalue()
    assert first.splitlines()[1:] == ["  aaaaaaaa l2 strength=1e-4 seed 0: epoch 1/3",
                                      "  bbbbbbbb l2 strength=1e-4 seed 1: epoch 2/3"]
    display.show(progress.update([job("a", "succeeded", 3), job("b", "running", 3, seed=1),
                                  job("c", "running", 0)], now=1))
    second = term.getvalue()[len(first):]
    assert second.startswith("\x1b[3F\x1b[J")  # up three lines, clear, redraw
    assert "1/3 done · 2 running" in second


def test_format_duration():
    assert [format_duration(s) for s in (None, 4.4, 65, 3725)] == ["?", "4s", "1m05s", "1h02m"]
