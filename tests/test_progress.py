"""Live progress: counts by state, running jobs' epochs and in-epoch steps, the ETA from status snapshots; plain
periodic lines off a terminal, a bar redrawn in place on one; final tables fitted to the terminal's width; and, on a
real local Ray, `run`'s start-up messages and step progress, and `watch` re-attaching to a running experiment."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
import yaml
from support import config, local_daemon, registry, wait_for
from test_aggregate import SPEC, _fill

from l2cluster.cli import _final_tables, _results_table, main
from l2cluster.results.aggregate import export_experiment
from l2cluster.results.progress import (
    Progress,
    ProgressDisplay,
    bar,
    epochs_done,
    fit_columns,
    format_duration,
    running_text,
    summary_line,
)
from l2cluster.results.store import Store
from l2cluster.spec import expand, parse_spec
from l2cluster.states import Outcome


def job(name, state, epoch, seed=0, label="l2", overrides=None, live=None):
    out = {"job": name * 16, "state": state, "epoch": epoch, "seed": seed, "label": label,
           "overrides": overrides if overrides is not None else {"regularizers.l2.strength": 1e-4}}
    if live is not None:
        out["live"] = live
    return out


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


def test_steps_inside_an_epoch_count_and_give_an_eta_before_the_first_epoch_ends():
    # The epoch in progress (live["epoch"] = finished epochs + 1) counts by its steps; a stale report (of an
    # epoch already finished) or one without steps counts nothing extra.
    assert epochs_done(job("a", "running", 0, live={"epoch": 1, "step": 25, "steps": 100}), 10) == 0.25
    assert epochs_done(job("a", "running", 3, live={"epoch": 4, "step": 50, "steps": 200}), 10) == 3.25
    assert epochs_done(job("a", "running", 4, live={"epoch": 4, "step": 200, "steps": 200}), 10) == 4.0
    assert epochs_done(job("a", "running", 2, live={"stage": "forming a gang"}), 10) == 2.0
    progress = Progress({"a" * 16: 10, "b" * 16: 10})
    first = progress.update([job("a", "running", 0, live={"epoch": 1, "step": 10, "steps": 100}),
                             job("b", "queued", 0)], now=0.0)
    assert first.epochs_done == pytest.approx(0.1) and first.eta_s is None
    later = progress.update([job("a", "running", 0, live={"epoch": 1, "step": 60, "steps": 100, "val_acc": None}),
                             job("b", "queued", 0)], now=10.0)
    # 0.5 epoch in 10 s: 0.05 epochs/s; 20 - 0.6 = 19.4 epochs to go → 388 s.
    assert later.epochs_done == pytest.approx(0.6) and later.eta_s == pytest.approx(19.4 / 0.05)
    assert later.fraction == pytest.approx(0.03)
    (a,) = later.running
    assert (a["epoch"], a["step"], a["steps"]) == (0, 60, 100)
    assert running_text(a) == "aaaaaaaa l2 strength=1e-4 seed 0: epoch 1/10 step 60/100"
    with_val = dict(a, epoch=3, step=7, steps=100, val_acc=0.95404)
    assert running_text(with_val) == "aaaaaaaa l2 strength=1e-4 seed 0: epoch 4/10 step 7/100, val acc 95.40 %"
    assert running_text(dict(a, steps=None, step=None, epoch=3, val_acc=0.9)).endswith("epoch 3/10, val acc 90.00 %")
    assert running_text(dict(a, state="placing", stage="loading MNIST")).endswith("seed 0: loading MNIST")
    assert summary_line("exp-1", later) == "exp-1: 0/2 done · 1 running · 1 queued | epochs 0.6/20 (3%), ETA 6m28s"


def test_the_eta_leaves_out_the_start_up_and_running_jobs_carry_their_configuration_name():
    progress = Progress({"a" * 16: 2}, {"a" * 16: "slow_steps"})
    progress.update([job("a", "queued", 0)], now=0.0)
    progress.update([job("a", "placing", 0, live={"stage": "forming a gang"})], now=30.0)  # gangs forming: 30 s
    first = progress.update([job("a", "running", 0, live={"epoch": 1, "step": 1, "steps": 100})], now=32.0)
    assert first.eta_s is None  # 2 s of work measured: too little to say
    moving = progress.update([job("a", "running", 0, live={"epoch": 1, "step": 10, "steps": 100})], now=40.0)
    # 0.1 epoch in the 10 s since work started moving (not in 40 s): 1.9 epochs to go → 190 s.
    assert moving.eta_s == pytest.approx(1.9 / 0.01)
    assert running_text(moving.running[0]) == "aaaaaaaa slow_steps seed 0: epoch 1/2 step 10/100"


def test_plain_lines_when_counts_change_progress_grows_or_periodically():
    progress = Progress({"a" * 16: 10, "b" * 16: 10})
    out = io.StringIO()
    display = ProgressDisplay("exp-1", out, min_interval_s=5, heartbeat_s=30)
    snaps = [
        (0, [job("a", "running", 1), job("b", "queued", 0)]),     # first: printed
        (2, [job("a", "running", 2), job("b", "queued", 0)]),     # +5 %: nothing to say yet
        (3, [job("a", "succeeded", 10), job("b", "running", 0)]),  # changed, but within 5 s of the last line
        (6, [job("a", "succeeded", 10), job("b", "running", 1)]),  # still changed since the last line: printed
        (20, [job("a", "succeeded", 10), job("b", "running", 2)]),  # same counts, +5 %, 14 s: quiet
        (21, [job("a", "succeeded", 10), job("b", "running", 3)]),  # +10 % since the last line: printed
        (23, [job("a", "succeeded", 10), job("b", "running", 3, live={"epoch": 4, "step": 1, "steps": 9})]),
        (54, [job("a", "succeeded", 10), job("b", "running", 3, live={"epoch": 4, "step": 3, "steps": 9})]),  # 30 s
        (55, [job("a", "succeeded", 10), job("b", "succeeded", 10)]),  # finished: always printed
    ]
    for at, jobs in snaps:
        display.show(progress.update(jobs, now=at))
    lines = out.getvalue().splitlines()
    assert len(lines) == 5, lines
    assert "\x1b" not in out.getvalue()
    assert "exp-1: 0/2 done · 1 running · 1 queued | epochs 1/20 (5%), ETA ?" in lines[0]
    assert lines[0].endswith("| aaaaaaaa l2 strength=1e-4 seed 0: epoch 1/10")
    assert "1/2 done · 1 running · 0 queued · 1 succeeded | epochs 11/20 (55%), ETA 5s" in lines[1]
    assert lines[2].endswith("bbbbbbbb l2 strength=1e-4 seed 0: epoch 3/10")
    # The heartbeat: 13 1/3 of 20 epochs, in epoch 4 at step 3 of 9.
    assert "epochs 13.3/20 (67%)" in lines[3] and lines[3].endswith("seed 0: epoch 4/10 step 3/9")
    assert "2/2 done · 0 running · 0 queued · 2 succeeded | epochs 20/20 (100%)" in lines[4]
    assert "ETA" not in lines[4]


def test_a_terminal_gets_a_bar_redrawn_in_place(monkeypatch):
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
    assert first.splitlines()[:2] == ["exp-1 ███████░░░░░░░░░░░░░ 33%, ETA ?",  # 3 of 9 epochs: 6.7 of 20 cells
                                      "  0/3 done · 2 running · 1 queued | epochs 3/9"]
    assert first.splitlines()[2:] == ["  aaaaaaaa l2 strength=1e-4 seed 0: epoch 1/3",
                                      "  bbbbbbbb l2 strength=1e-4 seed 1: epoch 2/3"]
    display.show(progress.update([job("a", "succeeded", 3), job("b", "running", 3, seed=1),
                                  job("c", "running", 0)], now=1))
    second = term.getvalue()[len(first):]
    assert second.startswith("\x1b[4F\x1b[J")  # up four lines, clear, redraw
    assert "1/3 done · 2 running" in second
    assert [bar(f, 10) for f in (0, 0.04, 0.5, 1, 1.2)] == ["░" * 10, "░" * 10, "█" * 5 + "░" * 5, "█" * 10, "█" * 10]


def test_what_placing_waits_for_is_said_once_above_the_block():
    progress = Progress({"a" * 16: 2, "b" * 16: 2})
    term = Terminal()
    display = ProgressDisplay("exp-1", term, tty=True)
    loading = {"stage": "loading MNIST"}
    display.show(progress.update([job("a", "placing", 0, live=loading), job("b", "placing", 0, live=loading)], now=0))
    forming = {"stage": "forming a gang"}
    display.show(progress.update([job("a", "placing", 0, live=forming), job("b", "placing", 0, live=forming)], now=1))
    display.show(progress.update([job("a", "placing", 0, live=forming), job("b", "queued", 0)], now=2))
    text = term.getvalue()
    assert text.count("loading MNIST …") == 1 and text.count("forming gangs") == 1
    assert text.index("loading MNIST …") < text.index("forming gangs")
    # The message clears the block drawn before it (4 lines), and the next block starts below it.
    assert "\x1b[4F\x1b[Jforming gangs: starting the worker processes (each imports torch) …\nexp-1 ░░" in text


def test_format_duration():
    assert [format_duration(s) for s in (None, 4.4, 65, 3725)] == ["?", "4s", "1m05s", "1h02m"]


def test_the_runner_reports_every_step_of_every_epoch_on_rank_0_only():
    import torch

    from l2cluster.testing import synthetic_splits
    from l2cluster.training.runner import Member, run_pack

    cfg = config(model={"hidden_sizes": [8]}, data={"batch_size": 100}, epochs=2)
    members = [Member("a" * 16, cfg), Member("b" * 16, cfg)]
    calls = []
    run = run_pack(members, synthetic_splits(n_train=320), registry(), device=torch.device("cpu"),
                   on_progress=lambda *args: calls.append(args))
    assert [r.outcome for r in run.results.values()] == [Outcome.SUCCEEDED, Outcome.SUCCEEDED]
    # 320 images in batches of 100: 4 steps per epoch (the last one of 20 images).
    ids = ["a" * 16, "b" * 16]
    assert calls == [(ids, epoch, step, 4) for epoch in (1, 2) for step in (1, 2, 3, 4)]
    other_rank = []  # a rank other than 0 (alone here, so no process group is needed) reports nothing
    run_pack(members[:1], synthetic_splits(n_train=320), registry(), device=torch.device("cpu"),
             done=(), on_progress=lambda *args: other_rank.append(args), rank=1, world=1)
    assert other_rank == []


# -- final tables --------------------------------------------------------------------------------------------
def test_fit_columns_drops_then_cuts():
    header = ["name", "a", "bb", "note"]
    rows = [["x" * 30, "1", "22", "n" * 40]]
    # Natural width: 30 + 1 + 2 + 40 + 3 * 2 = 79.
    assert fit_columns(header, rows, 79, drop=["bb"], cut=[("note", 10)]) == (header, rows, [])
    h, r, dropped = fit_columns(header, rows, 70, drop=["bb"], cut=[("note", 10)])
    assert (h, dropped) == (["name", "a", "note"], ["bb"])  # 75 wide without "bb": "note" loses 5 characters
    assert r == [["x" * 30, "1", "n" * 34 + "…"]] and len("  ".join(r[0])) == 70
    h, r, dropped = fit_columns(header, rows, 30, drop=["bb", "a"], cut=[("note", 10), ("name", 12)])
    assert h == ["name", "note"] and dropped == ["bb", "a"]
    # "note" at its minimum (10), "name" cut to what is left: 18 + 2 + 10 = 30.
    assert r == [["x" * 17 + "…", "n" * 9 + "…"]]
    h, r, _ = fit_columns(header, rows, 20, drop=["bb", "a"], cut=[("note", 10), ("name", 12)])
    assert r == [["x" * 11 + "…", "n" * 9 + "…"]]  # no narrower than the minimums: 24 wide, not 20


@pytest.fixture
def filled_export(tmp_path):
    store = Store(tmp_path / "store.db")
    jobs = expand(parse_spec(SPEC, registry()), registry())
    store.add_experiment("agg-1", "agg", SPEC, jobs)
    _fill(store, jobs)
    export = export_experiment(store, "agg-1")
    store.close()
    return export


def test_final_tables_fit_80_and_200_columns_with_accuracies_in_percent_everywhere(filled_export):
    wide = _final_tables(filled_export, 200)
    narrow = _final_tables(filled_export, 80)
    assert max(map(len, wide.splitlines())) <= 200 and max(map(len, narrow.splitlines())) <= 80
    assert max(map(len, wide.splitlines())) > 80  # there was something to fit
    jobs_wide, ranked_wide = wide.split("\n\n")
    # At 200 columns everything is there: full job ids, every column of the ranked table, nothing left out.
    assert jobs_wide.splitlines()[0].split() == ["job", "configuration", "seed", "outcome", "val", "acc", "%", "test",
                                                 "acc", "%", "epochs", "node", "error"]
    assert "left out" not in wide and re.search(r"^[0-9a-f]{16} ", jobs_wide.splitlines()[2])
    assert "weight norm" in ranked_wide.splitlines()[0]
    # The same accuracy in the same unit in both tables: percent with two decimals (the top group's mean val
    # accuracy is 97.20 %; its first job's is 97.00 %).
    top = ranked_wide.splitlines()[2]
    assert top.split()[:2] == ["1", "l2"] and "97.20" in top
    assert any(re.match(r"[0-9a-f]{16}  l2 strength=1e-4 +0 +succeeded +97\.00 +96\.00 ", line)
               for line in jobs_wide.splitlines()), jobs_wide
    assert "0.97" not in wide
    jobs_narrow, ranked_narrow = narrow.split("\n\n")
    assert "(left out to fit 80 columns: node, epochs)" in jobs_narrow
    assert re.search(r"^[0-9a-f]{8} ", jobs_narrow.splitlines()[2])  # job ids as the progress display shows them
    assert "loss became…" in jobs_narrow  # the diverged job's error, cut (`l2cluster logs JOB` has all of it)
    note = " ".join(ranked_narrow.split("\n(left out", 1)[1].split())
    assert note == ("to fit 80 columns: weight norm, test loss ± 95% CI, best val acc % (epoch), test acc sd, gap pp "
                    "± 95% CI; `l2cluster results agg-1` shows them)")
    assert ranked_narrow.splitlines()[0].split()[:7] == ["rank", "configuration", "n", "val", "acc", "%", "test"]
    assert "97.20" in ranked_narrow.splitlines()[2]
    # Without a width (stdout is a file; `results --jobs`): every column, the same units.
    assert _final_tables(filled_export, None) == wide
    assert _results_table(filled_export["jobs"]) == jobs_wide


# -- on a real local Ray -------------------------------------------------------------------------------------
SLOW_PLUGIN = '''
import time

from pydantic import BaseModel, ConfigDict

from l2cluster.plugin import Regularizer


class SlowSteps(Regularizer):
    """Sleeps 25 ms after every step: a run slow enough to watch (or fails at once with fail: 1)."""

    name = "slow_steps"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        fail: float = 0.0  # 1: raise instead

    def after_step(self, params, hp):
        if float(hp.fail.max()) > 0:
            raise RuntimeError("told to fail")
        time.sleep(0.025)
'''

# 500 training images in batches of 2: 250 steps per epoch, 6.25 s or more each with the plugin's sleep: longer than
# the 5 s between two progress lines, so a line falls inside an epoch however fast the machine.
SLOW = {"model": {"hidden_sizes": [16]}, "data": {"batch_size": 2, "val_size": 100},
        "optimizer": {"name": "adam", "lr": 0.003}, "epochs": 2, "regularizers": [{"name": "slow_steps"}],
        "sweep": {"seeds": [0, 1]}}


def _plugin_dir(tmp_path):
    directory = tmp_path / "plugins"
    directory.mkdir()
    (directory / "slow_steps.py").write_text(SLOW_PLUGIN)
    return directory


@pytest.mark.slow
def test_run_says_what_happens_from_the_start_and_shows_steps_inside_epochs(tmp_path, tiny_mnist_dir):
    spec = tmp_path / "slow.yaml"
    spec.write_text(yaml.safe_dump({"name": "slow", **SLOW}))
    env = {**os.environ, "L2CLUSTER_HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "disabled", "COLUMNS": "80"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "l2cluster.cli", "--plugin-dir", str(_plugin_dir(tmp_path)), "run",
                          str(spec), "--store", str(tmp_path / "store.db"), "--data-dir", str(tiny_mnist_dir),
                          "--num-cpus", "2"], env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout + run.stderr
    err = run.stderr
    # What placing waits for is said as the 2 s polls see it: loading MNIST, forming the gang, or both (a stage
    # shorter than a poll may be passed unseen).
    stage = max(err.find("loading MNIST …"), err.find("forming gangs: starting the worker processes"))
    said = ["starting a local Ray on 127.0.0.1 (2 CPUs) …", "starting the coordinator …", ": 2 job(s) on a local Ray"]
    at = [err.find(s) for s in said] + [stage]
    assert all(i >= 0 for i in at) and at == sorted(at), err
    # At least one line from inside an epoch: "epoch 1/2 step 40/250" (both seeds train as one pack).
    steps = re.findall(r"seed \d: epoch ([12])/2 step (\d+)/250", err)
    assert steps and all(1 <= int(s) <= 250 for _, s in steps), err
    assert "2/2 done · 0 running · 0 queued · 2 succeeded | epochs 4/4 (100%)" in err
    assert max(map(len, run.stdout.splitlines())) <= 80, run.stdout
    assert len(re.findall(r"^[0-9a-f]{8,16} +slow_steps +[01] +succeeded +\d+\.\d\d +\d+\.\d\d", run.stdout,
                          re.M)) == 2, run.stdout


@pytest.mark.slow
def test_watch_reattaches_to_a_running_experiment(tmp_path, tiny_mnist_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    spec = tmp_path / "watched.yaml"
    spec.write_text(yaml.safe_dump({"name": "watched", **SLOW}))
    with local_daemon(tmp_path / "store.db", num_cpus=2, plugin_dirs=[str(_plugin_dir(tmp_path))],
                      data_dir=str(tiny_mnist_dir)) as cluster:
        import ray

        assert main(["submit", str(spec)]) == 0
        experiment = capsys.readouterr().out.strip()
        # Watch from the moment the first job trains, as a user re-attaching to a sweep already under way.
        wait_for(lambda: any(j["state"] == "running" for j in ray.get(cluster["handle"].status.remote(experiment))),
                 "a running job", timeout_s=120)
        live = wait_for(lambda: [j["live"] for j in ray.get(cluster["handle"].status.remote(experiment))
                                 if j.get("live", {}).get("step")], "a step report", timeout_s=30)
        assert live[0]["steps"] == 250 and live[0]["epoch"] in (1, 2)
        assert main(["watch", experiment]) == 0
        out, err = capsys.readouterr()
        assert f"{experiment}: 2/2 done · 0 running · 0 queued · 2 succeeded | epochs 4/4 (100%)" in err
        assert re.search(r"seed [01]: epoch [12]/2", err), err
        jobs = [line for line in out.splitlines() if re.match(r"^[0-9a-f]{16} ", line)]
        assert len(jobs) == 2 and all(" succeeded " in line for line in jobs), out
        assert "weight norm" in out and "left out" not in out  # 200 columns: the whole ranked table
        # Watching it again once it has finished: the tables at once; an unknown experiment: exit 2, named.
        assert main(["watch", experiment]) == 0
        assert len([line for line in capsys.readouterr().out.splitlines() if re.match(r"^[0-9a-f]{16} ", line)]) == 2
        assert main(["watch", "nope"]) == 2
        assert "no experiment 'nope'" in capsys.readouterr().err
        # A job that fails: watch exits 1, as `submit --wait` does, and the table says why.
        failing = tmp_path / "failing.yaml"
        spec = {"name": "failing", **SLOW, "regularizers": [{"name": "slow_steps", "fail": 1}], "sweep": {}}
        failing.write_text(yaml.safe_dump(spec))
        assert main(["submit", str(failing)]) == 0
        assert main(["watch", capsys.readouterr().out.strip()]) == 1
        out = capsys.readouterr().out
        assert re.search(r"^[0-9a-f]{16}  slow_steps +0 +failed +- +- .*slow_steps", out, re.M), out
