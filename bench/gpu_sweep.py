"""Benchmark: a regularization sweep through the daemon on one GPU — throughput, accuracy, and an unpacked control.

On the reference configuration (`jobs/reference.yaml`: MLP 784-512-256-128-10, dropout 0.2, AdamW, L2 term,
batch 64, 10 epochs) it starts a local daemon of its own (a temporary L2CLUSTER_HOME, so a user's store is never
touched; `--address` uses a running one instead), forms the gang with a 1-epoch job, then measures on the warm
gang, from the store's timestamps:
  1. one reference job, submit → result, with per-epoch checkpoints on (the daemon's default);
  2. the sweep: `--strengths` L2 strengths log-spaced over 1e-5..1e-1 × `--seeds` seeds (256 jobs by default),
     submit → last result, per-job cost, and mean test accuracy overall and per strength;
  3. an unpacked control: `--control-strengths` of those strengths × the first `--control-seeds` seeds with
     `scaling.pack: false`, its per-job time, and per strength the difference of its mean test accuracy from the
     packed runs of the same seeds, beside the seed-to-seed standard deviation.
Each stage stops waiting after its time limit, cancels what is left and reports what finished.

    python bench/gpu_sweep.py --data-dir DIR --json sweep.json                     # the GPU run (16 × 16)
    python bench/gpu_sweep.py --data-dir DIR --device cpu --epochs 1 --strengths 2 --seeds 2 \\
        --train-size 2000 --hidden 64,32                                         # a smoke test on a CPU

`--max-pack` and `scaling.pack` are used only where this l2cluster has them (the output says when it does not).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TERMINAL = ("succeeded", "failed", "diverged", "cancelled")
STRENGTH = "regularizers.l2.strength"
REPO = Path(__file__).resolve().parent.parent


def log_spaced(n: int, lo: float = 1e-5, hi: float = 1e-1) -> list[float]:
    """n strengths evenly spaced in log10 from lo to hi, rounded to 4 significant digits (readable ids and JSON)."""
    if n == 1:
        return [lo]
    return [float(f"{10 ** (math.log10(lo) + i * (math.log10(hi) - math.log10(lo)) / (n - 1)):.4g}")
            for i in range(n)]


def spread(values: list, k: int) -> list:
    """k of values, evenly spread from the first to the last."""
    if k >= len(values):
        return list(values)
    if k == 1:
        return [values[len(values) // 2]]
    return [values[round(i * (len(values) - 1) / (k - 1))] for i in range(k)]


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


# -- the daemon ----------------------------------------------------------------------------------------------------
def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`l2cluster ARGS` as a child process of this Python (no console script needed)."""
    return subprocess.run([sys.executable, "-m", "l2cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def supports_max_pack() -> bool:
    return "--max-pack" in cli("daemon", "--help").stdout


def supports_pack_field(spec: dict) -> bool:
    """Whether this l2cluster's spec accepts `scaling.pack` (validated, not guessed from the source)."""
    from l2cluster.registry import load_registry
    from l2cluster.spec import SpecError, parse_spec

    try:
        parse_spec({**spec, "scaling": {**spec.get("scaling", {}), "pack": False}}, load_registry())
    except SpecError:
        return False
    return True


def start_daemon(args, notes: list[str]) -> None:
    cmd = ["daemon", "start", "--idle-release-s", "3600"]
    cmd += ["--data-dir", args.data_dir] if args.data_dir else []
    cmd += ["--num-cpus", str(args.num_cpus)] if args.num_cpus else []
    if args.max_pack is not None:
        if supports_max_pack():
            cmd += ["--max-pack", str(args.max_pack)]
        else:
            notes.append(f"--max-pack {args.max_pack} ignored: this l2cluster's daemon has no --max-pack")
    done = cli(*cmd)
    if done.returncode != 0:
        raise SystemExit(f"daemon start failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    print(done.stdout.strip(), flush=True)


# -- one stage: submit a spec, wait, read the store's timestamps ------------------------------------------------------
def run_stage(coordinator, spec: dict, timeout_s: float) -> dict:
    """Submit spec, wait until every job is terminal (or cancel what is left after timeout_s), return its numbers."""
    import ray

    submitted = time.time()
    sub = ray.get(coordinator.submit.remote(spec, 0, spec["name"]), timeout=300)
    exp, n = sub["experiment"], sub["jobs"]
    accepted_s = time.time() - submitted
    timed_out = False
    while True:
        counts = next((e["counts"] for e in ray.get(coordinator.status.remote()) if e["experiment"] == exp), {})
        if sum(counts.get(s, 0) for s in TERMINAL) >= n:
            break
        if time.time() - submitted > timeout_s:
            timed_out = True
            ray.get(coordinator.cancel.remote(exp))
            while True:  # a running job stops before its next step
                counts = next(e["counts"] for e in ray.get(coordinator.status.remote()) if e["experiment"] == exp)
                if sum(counts.get(s, 0) for s in TERMINAL) >= n or time.time() - submitted > timeout_s + 60:
                    break
                time.sleep(0.2)
            break
        time.sleep(0.1)
    seen_s = time.time() - submitted
    jobs = ray.get(coordinator.results.remote(exp), timeout=300)
    ok = [j for j in jobs if j["state"] == "succeeded"]
    finals = [(j["result"] or {}).get("final") or {} for j in ok]
    on_gang = [j["finished_at"] - j["started_at"] for j in ok if j["started_at"] and j["finished_at"]]
    last = max((j["finished_at"] for j in ok), default=float("nan"))
    first_start = min((j["started_at"] for j in jobs if j["started_at"]), default=float("nan"))
    wall = last - submitted
    acc_mean, acc_sd = mean_sd([f.get("test_acc") for f in finals])
    return {
        "experiment": exp, "num_jobs": n, "num_succeeded": len(ok),
        "states": {s: sum(j["state"] == s for j in jobs) for s in sorted({j["state"] for j in jobs})},
        "timed_out": timed_out, "accept_s": accepted_s, "submit_to_first_start_s": first_start - submitted,
        "submit_to_last_result_s": wall, "observed_done_s": seen_s,
        "per_job_s": wall / len(ok) if ok else float("nan"),
        "on_gang_s_mean": statistics.fmean(on_gang) if on_gang else float("nan"),
        "train_s_mean": statistics.fmean([f["train_s"] for f in finals if f.get("train_s") is not None] or [math.nan]),
        "test_acc_mean": acc_mean, "test_acc_sd": acc_sd,
        "errors": sorted({j["error"] for j in jobs if j.get("error")})[:5],
        "jobs": [{"job": j["job"], "seed": j["seed"], "strength": j["overrides"].get(STRENGTH), "state": j["state"],
                  "started_at": j["started_at"], "finished_at": j["finished_at"],
                  "final": (j["result"] or {}).get("final")} for j in jobs],
    }


def by_strength(stage: dict, seeds: set | None = None) -> dict[float, tuple[float, float, int]]:
    """strength → (mean, sd, n) of test accuracy over the stage's succeeded jobs (only these seeds, when given)."""
    groups: dict[float, list[float]] = {}
    for j in stage["jobs"]:
        if j["state"] == "succeeded" and (seeds is None or j["seed"] in seeds) and (j["final"] or {}).get("test_acc"):
            groups.setdefault(j["strength"], []).append(j["final"]["test_acc"])
    return {s: (*mean_sd(v), len(v)) for s, v in sorted(groups.items())}


def describe(name: str, st: dict) -> str:
    cut = " (stopped at its time limit; the rest cancelled)" if st["timed_out"] else ""
    return (f"{name}: {st['num_succeeded']}/{st['num_jobs']} succeeded{cut}; submit → first start "
            f"{st['submit_to_first_start_s']:.2f} s, submit → last result {st['submit_to_last_result_s']:.2f} s, "
            f"{st['per_job_s']:.3f} s per job; on the gang {st['on_gang_s_mean']:.2f} s, training "
            f"{st['train_s_mean']:.2f} s (means); test_acc {st['test_acc_mean']:.4f} ± {st['test_acc_sd']:.4f}")


# -- main -----------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(REPO / "jobs" / "reference.yaml"), help="base spec (default: the reference)")
    p.add_argument("--data-dir", help="MNIST folder for the daemon it starts")
    p.add_argument("--address", help="use this running daemon's cluster instead of starting one")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="scaling.use_gpu true (cuda) or false")
    p.add_argument("--strengths", type=int, default=16, help="L2 strengths, log-spaced over 1e-5..1e-1")
    p.add_argument("--seeds", type=int, default=16, help="seeds per strength (0..N-1)")
    p.add_argument("--epochs", type=int, help="replace the spec's epochs (sweep, control and single job)")
    p.add_argument("--train-size", type=int, help="data.train_size (smoke tests)")
    p.add_argument("--hidden", help="model.hidden_sizes, e.g. 64,32 (smoke tests)")
    p.add_argument("--tf32", action="store_true", help="model.tf32: true (TF32 matmuls) for every stage")
    p.add_argument("--control-strengths", type=int, default=2, help="strengths in the unpacked control (0: none)")
    p.add_argument("--control-seeds", type=int, default=4, help="seeds per strength in the unpacked control")
    p.add_argument("--max-pack", type=int, help="pass --max-pack N to the daemon it starts")
    p.add_argument("--num-cpus", type=int, help="CPUs of the daemon's local Ray (default: all)")
    p.add_argument("--sweep-timeout-s", type=float, default=240, help="stop waiting for the sweep after this long")
    p.add_argument("--stage-timeout-s", type=float, default=90, help="the same for each of the other stages")
    p.add_argument("--home", help="L2CLUSTER_HOME of the daemon it starts (default: a new temporary folder, removed)")
    p.add_argument("--json", help="write every number (and each job's final metrics) here")
    p.add_argument("--daemon-log", help="copy the daemon's log here at the end")
    args = p.parse_args(argv)

    from l2cluster.spec import read_spec_file

    base = read_spec_file(args.spec)
    base.pop("sweep", None)
    base["scaling"] = {**base.get("scaling", {}), "num_workers": 1, "use_gpu": args.device == "cuda"}
    if args.epochs:
        base["epochs"] = args.epochs
    if args.train_size:
        base.setdefault("data", {})["train_size"] = args.train_size
    if args.hidden:
        base.setdefault("model", {})["hidden_sizes"] = [int(h) for h in args.hidden.split(",")]
    if args.tf32:
        base.setdefault("model", {})["tf32"] = True
    strengths = log_spaced(args.strengths)
    seeds = list(range(args.seeds))
    notes: list[str] = []
    can_unpack = supports_pack_field(base)
    if not can_unpack:
        notes.append("scaling.pack not in this l2cluster's spec: the control runs with the daemon's defaults")

    own_home = None
    if not args.address:
        own_home = args.home or tempfile.mkdtemp(prefix="l2c-gpu-sweep-")
        os.environ["L2CLUSTER_HOME"] = own_home  # store, checkpoints, daemon.json and daemon.log live here
    report: dict = {"device": args.device, "spec": args.spec, "epochs": base["epochs"], "strengths": strengths,
                    "seeds": seeds, "max_pack": args.max_pack, "notes": notes}
    try:
        import ray

        from l2cluster.cluster import daemon

        t0 = time.time()
        if own_home:
            start_daemon(args, notes)
        daemon.connect(args.address)
        coordinator = daemon.coordinator()
        report["daemon_start_s"] = time.time() - t0
        report["cluster"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        print(f"daemon up in {report['daemon_start_s']:.1f} s; cluster {report['cluster']}", flush=True)
        if args.device == "cuda" and not report["cluster"].get("GPU"):
            raise SystemExit("the daemon's Ray sees no GPU: jobs with scaling.use_gpu true would wait forever")
        stages = report["stages"] = {}

        warm = {**base, "name": "gpu-warmup", "epochs": 1, "seed": 10_000}
        stages["warmup"] = run_stage(coordinator, warm, args.stage_timeout_s)
        print(describe("warm-up (forms the gang)", stages["warmup"]), flush=True)

        single = {**base, "name": "gpu-single", "seed": 10_001}
        stages["single"] = run_stage(coordinator, single, args.stage_timeout_s)
        print(describe("one reference job, warm gang, checkpoints on", stages["single"]), flush=True)

        sweep = {**base, "name": "gpu-sweep", "sweep": {"seeds": seeds, "grid": {STRENGTH: strengths}}}
        stages["sweep"] = run_stage(coordinator, sweep, args.sweep_timeout_s)
        print(describe(f"sweep {len(strengths)} strengths × {len(seeds)} seeds", stages["sweep"]), flush=True)
        report["gangs"] = ray.get(coordinator.gangs_info.remote())

        control_strengths = spread(strengths, args.control_strengths)
        control_seeds = seeds[: args.control_seeds]
        if control_strengths and control_seeds:
            scaling = {**base["scaling"], **({"pack": False} if can_unpack else {})}
            control = {**base, "name": "gpu-control", "scaling": scaling,
                       "sweep": {"seeds": control_seeds, "grid": {STRENGTH: control_strengths}}}
            stages["control"] = run_stage(coordinator, control, args.stage_timeout_s)
            print(describe(f"unpacked control {len(control_strengths)} × {len(control_seeds)}", stages["control"]))
            report["control_vs_packed"] = compare(stages["sweep"], stages["control"], set(control_seeds))
    finally:  # the numbers first, then the daemon: an interrupted run (a time limit's SIGINT) keeps what finished
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        summarize(report)
        if own_home:
            import ray

            from l2cluster.cluster import daemon

            ray.shutdown()  # leave the cluster while it is up: a driver whose cluster is gone hangs at exit
            # What `l2cluster daemon stop` does, without starting another Python (and torch) to do it.
            print("local daemon stopped" if daemon.stop_local_daemon() else "no local daemon was running", flush=True)
            log = Path(own_home) / "daemon.log"
            if args.daemon_log and log.exists():
                shutil.copyfile(log, args.daemon_log)
            if not args.home:
                shutil.rmtree(own_home, ignore_errors=True)
    return 0 if all(st["num_succeeded"] == st["num_jobs"] for st in report["stages"].values()) else 1


def compare(sweep: dict, control: dict, seeds: set) -> list[dict]:
    """Per control strength: packed and unpacked mean test accuracy over the same seeds, their difference, the
    seed-to-seed sd (packed runs, all seeds), and the largest difference of one seed's pair."""
    packed, unpacked, packed_all = by_strength(sweep, seeds), by_strength(control), by_strength(sweep)
    pairs = {(j["strength"], j["seed"]): j["final"]["test_acc"] for j in sweep["jobs"]
             if j["state"] == "succeeded" and j["final"]}
    rows = []
    for s, (mu_u, _sd_u, n_u) in unpacked.items():
        mu_p, _, n_p = packed.get(s, (float("nan"), float("nan"), 0))
        diffs = [abs(j["final"]["test_acc"] - pairs[(s, j["seed"])]) for j in control["jobs"]
                 if j["state"] == "succeeded" and j["final"] and (s, j["seed"]) in pairs and j["strength"] == s]
        rows.append({"strength": s, "packed_mean": mu_p, "packed_n": n_p, "unpacked_mean": mu_u, "unpacked_n": n_u,
                     "difference": mu_p - mu_u, "seed_sd": packed_all.get(s, (0, float("nan"), 0))[1],
                     "max_pair_abs_diff": max(diffs) if diffs else float("nan")})
    return rows


def summarize(report: dict) -> None:
    stages = report.get("stages", {})
    print(f"\n== gpu_sweep summary ({report['device']}, cluster {report.get('cluster')}, "
          f"{report['epochs']} epochs, max_pack {report['max_pack']}) ==")
    for note in report["notes"]:
        print(f"note: {note}")
    for name in ("warmup", "single", "sweep", "control"):
        if name in stages:
            st = stages[name]
            print(f"{name:8} {st['num_succeeded']:4}/{st['num_jobs']:<4} "
                  f"submit→last {st['submit_to_last_result_s']:8.2f} s"
                  f"  per job {st['per_job_s']:7.3f} s  training {st['train_s_mean']:6.2f} s"
                  f"  test_acc {st['test_acc_mean']:.4f} ± {st['test_acc_sd']:.4f}"
                  + ("  TIMED OUT" if st["timed_out"] else "") + (f"  errors: {st['errors']}" if st["errors"] else ""))
    if "sweep" in stages:
        print("per strength (sweep): " + ", ".join(f"{s:.3g}: {m:.4f}±{sd:.4f} (n={n})"
                                                     for s, (m, sd, n) in by_strength(stages["sweep"]).items()))
    for row in report.get("control_vs_packed", []):
        print(f"strength {row['strength']:.3g}: packed {row['packed_mean']:.4f} (n={row['packed_n']}) − unpacked "
              f"{row['unpacked_mean']:.4f} (n={row['unpacked_n']}) = {row['difference']:+.4f}; seed sd "
              f"{row['seed_sd']:.4f}; largest same-seed |Δ| {row['max_pair_abs_diff']:.4f}")
    if "sweep" in stages and "control" in stages:
        s, c = stages["sweep"], stages["control"]
        print(f"per-job time: packed sweep {s['per_job_s']:.3f} s, unpacked control {c['per_job_s']:.3f} s "
              f"({c['per_job_s'] / s['per_job_s']:.1f}× the packed)")


if __name__ == "__main__":
    sys.exit(main())
