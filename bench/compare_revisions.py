"""Benchmark: two revisions of this repo, same run, same machine: did a change make training or sweeps slower?

For each revision (BEFORE, AFTER) it checks the revision out into a temporary detached `git worktree` and runs
that revision's own bench scripts from inside it, with the package taken from that worktree (PYTHONPATH):

  bench/reference_vs_l2cluster.py --epochs 2 --threads 1   the article's loop and l2cluster's trainer, s/epoch
  bench/sweep_throughput.py --ways c,d                     `l2cluster run` unpacked (c) and packed (d), jobs/min

Rounds are interleaved, BEFORE then AFTER in round 1, AFTER then BEFORE in round 2, and so on (ABBA), so that a
machine that slows down or speeds up during the run affects both sides alike. The table shows, per figure, the
median over rounds of each side and AFTER/BEFORE. Seconds per epoch: lower is better, a ratio above 1 means
AFTER is slower. Jobs per minute: higher is better, a ratio below 1 means AFTER is slower. Accuracies come from
the same seeds on both sides, so a change there means the change altered what is trained, not just its speed.
The article's loop is plain torch (l2cluster only splits its data and sets the allocator): it is the control,
its ratio shows how much the machine itself drifted.

    python bench/compare_revisions.py 58eed10 HEAD --data-dir ../shared/data/mnist [--rounds 2] [--json OUT]
    python bench/compare_revisions.py HEAD WORKTREE --data-dir ../shared/data/mnist --quick --rounds 1
    make bench-compare BEFORE=58eed10 AFTER=HEAD

AFTER (or BEFORE) may be WORKTREE: the current working tree, uncommitted changes and untracked files included
(ignored files not). It is snapshotted as a commit object made with a temporary index (the branch, the index and
the files are left alone) and checked out like any revision. --quick runs a smoke-sized version (1 epoch, a
2-job sweep on 4,000 images); its figures only show that everything runs. The worktrees are removed at the end,
also on an error or Ctrl-C. The sweep needs no Ray Tune (ways c and d only). Use one machine and one venv for
both sides: only the l2cluster code differs between them, torch and Ray are the venv's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKTREE = "WORKTREE"

REFERENCE_ARGS = ["--epochs", "2", "--threads", "1"]
SWEEP_ARGS = ["--ways", "c,d"]
QUICK_REFERENCE_ARGS = ["--epochs", "1", "--threads", "1"]
QUICK_SWEEP_ARGS = ["--ways", "c,d", "--epochs", "1", "--train-size", "4000", "--seeds", "0",
                    "--strengths", "0,0.001"]

# (key, label, format, which way is better) in the table's order.
FIGURES = [
    ("article_epoch_s", "article loop, s/epoch (control)", "{:.3f}", "lower"),
    ("l2cluster_epoch_s", "l2cluster trainer, s/epoch", "{:.3f}", "lower"),
    ("sweep_c_jobs_per_min", "sweep (c) max-pack 1, jobs/min", "{:.2f}", "higher"),
    ("sweep_d_jobs_per_min", "sweep (d) packed, jobs/min", "{:.2f}", "higher"),
    ("article_test_acc", "article loop, test acc", "{:.4f}", "higher"),
    ("l2cluster_test_acc", "l2cluster trainer, test acc", "{:.4f}", "higher"),
    ("sweep_c_test_acc", "sweep (c), mean test acc", "{:.4f}", "higher"),
    ("sweep_d_test_acc", "sweep (d), mean test acc", "{:.4f}", "higher"),
]


class Interrupted(Exception):
    """SIGTERM, turned into an exception so that the worktrees are removed as on Ctrl-C."""


def on_sigterm(signum, frame) -> None:
    raise Interrupted("terminated")


def git(*args: str, env: dict | None = None) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, env=env).stdout.strip()


def snapshot_worktree() -> str:
    """A commit of the working tree as it is now (untracked files included, ignored ones not), made with a
    temporary index: HEAD, the branch, the index and the files are not touched. The commit is unreachable and
    goes with the next `git gc`."""
    with tempfile.TemporaryDirectory(prefix="l2c-compare-index-") as tmp:
        env = dict(os.environ, GIT_INDEX_FILE=str(Path(tmp) / "index"),
                   GIT_AUTHOR_NAME="compare_revisions", GIT_AUTHOR_EMAIL="compare_revisions@localhost",
                   GIT_COMMITTER_NAME="compare_revisions", GIT_COMMITTER_EMAIL="compare_revisions@localhost")
        index = Path(git("rev-parse", "--path-format=absolute", "--git-path", "index"))
        if index.exists():
            shutil.copy(index, env["GIT_INDEX_FILE"])  # a head start: unchanged files need no re-hashing
        git("add", "--all", ".", env=env)
        tree = git("write-tree", env=env)
        if tree == git("rev-parse", "HEAD^{tree}"):
            return git("rev-parse", "HEAD")
        return git("commit-tree", tree, "-p", "HEAD", "-m", "compare_revisions: working tree snapshot", env=env)


def describe(rev: str) -> dict:
    """The commit a revision names, with what the table shows of it."""
    if rev == WORKTREE:
        commit = snapshot_worktree()
        dirty = commit != git("rev-parse", "HEAD")
        head = git("rev-parse", "--short", "HEAD")
        return {"rev": rev, "commit": commit, "short": head + ("+changes" if dirty else ""),
                "subject": "working tree" + (f" (HEAD {head} and uncommitted changes)" if dirty else " (clean)")}
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        raise SystemExit(f"not a revision of {ROOT}: {rev!r}") from None
    return {"rev": rev, "commit": commit, "short": git("rev-parse", "--short", commit),
            "subject": git("log", "-1", "--format=%s", commit)}


def add_worktree(commit: str, path: Path) -> None:
    git("worktree", "add", "--detach", "--quiet", str(path), commit)
    # The venv's editable install maps l2cluster.plugins to its own checkout's plugins/ folder, and that mapping
    # answers where PYTHONPATH finds no l2cluster/plugins: give the worktree one, pointing at its own plugins/.
    link = path / "l2cluster" / "plugins"
    if (path / "plugins" / "__init__.py").exists() and not link.exists():
        link.symlink_to(Path("..") / "plugins")


def remove_worktree(path: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def side_env(worktree: Path) -> dict:
    """The environment of every command run for one side: its package first on the path, nothing else."""
    return dict(os.environ, PYTHONPATH=str(worktree))


def check_own_code(worktree: Path, env: dict) -> dict:
    """Fail unless the side's Python and the `l2cluster` command both import l2cluster from its worktree."""
    probe = ("import json, l2cluster, l2cluster.plugins; "
             "print(json.dumps([l2cluster.__file__, l2cluster.plugins.__file__]))")
    # Run from outside the worktree: `python -c` puts its working directory on the path, a bench script does not.
    out = subprocess.run([sys.executable, "-c", probe], cwd=worktree.parent, env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"importing l2cluster in {worktree} failed:\n{out.stderr[-2000:]}")
    package, plugins = json.loads(out.stdout.strip().splitlines()[-1])
    # The console script that sweep_throughput.py runs (`l2cluster` beside the interpreter): Python's verbose
    # import log names the file each module's code came from.
    beside = Path(sys.executable).with_name("l2cluster")
    command = str(beside) if beside.exists() else shutil.which("l2cluster")
    if command is None:
        raise RuntimeError("no `l2cluster` command beside this Python or on PATH: sweep_throughput.py needs one")
    verbose = subprocess.run([command, "--help"], cwd=worktree, env=dict(env, PYTHONVERBOSE="1"),
                             capture_output=True, text=True)
    match = re.search(r"^# code object from '?(\S*/l2cluster/(?:__pycache__/)?cli[.]\S*?)'?$", verbose.stderr,
                      re.MULTILINE)
    cli = match.group(1) if match else None
    wanted = worktree.resolve()
    for what, path in (("l2cluster", package), ("l2cluster.plugins", plugins), (f"{command} (l2cluster.cli)", cli)):
        if path is None or not Path(path).resolve().is_relative_to(wanted):
            raise RuntimeError(f"{what} comes from {path}, not from the worktree {worktree}: the comparison would "
                               "measure the wrong code")
    return {"l2cluster": package, "l2cluster.plugins": plugins, "l2cluster command imports": cli}


def stop(proc: subprocess.Popen) -> None:
    """Interrupt a bench script as Ctrl-C would, so that it stops what it started (Ray), then wait for it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_bench(worktree: Path, script: str, args: list[str], env: dict, out: Path) -> dict:
    """One of the side's own bench scripts, from inside its worktree; returns the JSON it wrote."""
    cmd = [sys.executable, str(worktree / "bench" / script), *args, "--json", str(out)]
    log = out.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=worktree, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait()
        except BaseException:
            stop(proc)
            raise
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{script} exited {proc.returncode} in {worktree}\n  command: {' '.join(cmd)}\n"
                           f"  output ends:\n{log.read_text()[-3000:]}")
    print(f"    {script}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(out.read_text())


def figures_of(reference: dict, sweep: dict) -> tuple[dict, list[str]]:
    """The compared figures of one round of one side, and the sweep's notes (a way it skipped or lost)."""
    figures = {
        "article_epoch_s": statistics.mean(reference["article_epoch_s"]),
        "l2cluster_epoch_s": statistics.mean(reference["l2cluster_epoch_s"]),
        "article_test_acc": reference["article_test_acc"],
        "l2cluster_test_acc": reference["l2cluster_test_acc"],
    }
    notes = list(sweep.get("notes", []))
    for way in ("c", "d"):
        f = sweep["ways"].get(way)
        if f is None:
            continue
        figures[f"sweep_{way}_jobs_per_min"] = f["jobs_per_min"]
        figures[f"sweep_{way}_test_acc"] = f["test_acc_mean"]
        if f["failed"]:
            notes.append(f"({way}) {f['failed']} job(s) failed")
    return figures, notes


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": names[0] if names else platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "usable_cores": usable,
            "python": platform.python_version(), "torch": version("torch"), "ray": version("ray")}


def summarize(rounds: dict[str, list[dict]]) -> dict:
    """Per figure: each side's values over the rounds, their medians and AFTER/BEFORE."""
    summary = {}
    for key, _, _, better in FIGURES:
        values = {side: [r[key] for r in rounds[side] if r.get(key) is not None] for side in ("before", "after")}
        medians = {side: statistics.median(v) if v else None for side, v in values.items()}
        ratio = medians["after"] / medians["before"] if medians["before"] and medians["after"] is not None else None
        summary[key] = {"before": medians["before"], "after": medians["after"], "after_over_before": ratio,
                        "better": better, "before_rounds": values["before"], "after_rounds": values["after"]}
    return summary


def print_table(summary: dict, sides: dict, info: dict) -> None:
    print(f"BEFORE {sides['before']['short']} ({sides['before']['rev']}): {sides['before']['subject']}")
    print(f"AFTER  {sides['after']['short']} ({sides['after']['rev']}): {sides['after']['subject']}")
    m = info["machine"]
    print(f"{info['date']}; {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable); torch {m['torch']}, "
          f"ray {m['ray']}, Python {m['python']}; {info['rounds']} round(s), ABBA"
          f"{'; --quick (smoke-sized: not a measurement)' if info['quick'] else ''}")
    print(f"{'figure':<34}{'better':>8}{'BEFORE':>10}{'AFTER':>10}{'AFTER/BEFORE':>14}")
    for key, label, fmt, better in FIGURES:
        s = summary[key]
        cells = [fmt.format(s[side]) if s[side] is not None else "-" for side in ("before", "after")]
        ratio = f"{s['after_over_before']:.3f}" if s["after_over_before"] is not None else "-"
        print(f"{label:<34}{better:>8}{cells[0]:>10}{cells[1]:>10}{ratio:>14}")
    print("s/epoch: a ratio above 1 is AFTER slower; jobs/min: a ratio below 1 is AFTER slower. Medians over rounds.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", help="git revision to compare from (or WORKTREE)")
    p.add_argument("after", help="git revision to compare to, or WORKTREE: the working tree, uncommitted changes too")
    p.add_argument("--data-dir", default=None, help="MNIST folder (else L2CLUSTER_DATA, the cache)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each runs both sides, order alternating (default 2)")
    p.add_argument("--json", type=Path, help="write the figures to this file too")
    p.add_argument("--quick", action="store_true", help="smoke-sized settings: checks that everything runs")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    # The bench scripts run in the worktrees: paths given relative to here must not change meaning there.
    data_args = ["--data-dir", str(Path(args.data_dir).resolve())] if args.data_dir else []
    reference_args = (QUICK_REFERENCE_ARGS if args.quick else REFERENCE_ARGS) + data_args
    sweep_args = (QUICK_SWEEP_ARGS if args.quick else SWEEP_ARGS) + data_args
    json_out = args.json.resolve() if args.json else None
    if os.environ.get("PYTHONPATH"):
        print(f"note: PYTHONPATH={os.environ['PYTHONPATH']} is replaced by each side's worktree", file=sys.stderr)

    sides = {"before": describe(args.before), "after": describe(args.after)}
    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "rounds": args.rounds, "quick": args.quick, "reference_args": reference_args, "sweep_args": sweep_args}
    # SIGTERM unwinds like Ctrl-C; and Ctrl-C is never ignored (as it is in a background job), so that the bench
    # scripts, which inherit an ignored SIGINT, can be interrupted too and stop the Ray they started.
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="l2c-compare-"))
    worktrees: dict[str, Path] = {}
    rounds: dict[str, list[dict]] = {"before": [], "after": []}
    notes: list[str] = []
    try:
        for side, d in sides.items():
            worktrees[side] = work / side
            add_worktree(d["commit"], worktrees[side])
            d["imports"] = check_own_code(worktrees[side], side_env(worktrees[side]))
            print(f"{side}: {d['short']} checked out in {worktrees[side]}; l2cluster from {d['imports']['l2cluster']}",
                  file=sys.stderr, flush=True)
        for n in range(1, args.rounds + 1):
            order = ("before", "after") if n % 2 else ("after", "before")
            for side in order:
                print(f"round {n}/{args.rounds}: {side.upper()} ({sides[side]['short']})", file=sys.stderr, flush=True)
                env = side_env(worktrees[side])
                reference = run_bench(worktrees[side], "reference_vs_l2cluster.py", reference_args, env,
                                      work / f"{side}-{n}-reference.json")
                sweep = run_bench(worktrees[side], "sweep_throughput.py", sweep_args, env,
                                  work / f"{side}-{n}-sweep.json")
                figures, side_notes = figures_of(reference, sweep)
                rounds[side].append(figures)
                notes += [f"round {n} {side.upper()}: {note}" for note in side_notes]
    except (KeyboardInterrupt, Interrupted):
        print("interrupted: removing the worktrees", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"error: {' '.join(e.cmd)} exited {e.returncode}: {e.stderr.strip()}", file=sys.stderr)
        return 1
    finally:
        for path in worktrees.values():
            remove_worktree(path)
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)

    summary = summarize(rounds)
    print_table(summary, sides, info)
    for note in notes:
        print(f"note: {note}")
    if json_out:
        json_out.write_text(json.dumps({**info, "before": sides["before"], "after": sides["after"],
                                        "figures": summary, "notes": notes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
