"""Benchmark: the coordinator's per-job overhead with a warm gang, and the cost of accepting a huge sweep.

Runs a local Ray (127.0.0.1) with a coordinator, queues N tiny one-rank jobs that all need the same single gang
(so they run back to back on warm processes), and prints, from the store's timestamps:
  - submit → first job start, and job end → next job start (the coordinator's scheduling gap), median / p90;
  - each job's time on the gang minus its training time (worker-side set-up: config, split, model);
then submits a 10,000-job sweep, times its acceptance, reads the coordinator's resident memory, measures the
scheduling gap while the whole sweep is queued, and cancels it.

    python bench/daemon_overhead.py --data-dir ../shared/data/mnist [--jobs 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

from l2cluster.cluster.daemon import start_coordinator, start_local_ray
from l2cluster.results.store import Store

TINY = {"model": {"hidden_sizes": [8]}, "data": {"batch_size": 100, "val_size": 100, "train_size": 200},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 1,
        "scaling": {"num_workers": 1, "cpus_per_worker": 2}}


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir")
    p.add_argument("--jobs", type=int, default=60)
    p.add_argument("--sweep", type=int, default=10_000)
    args = p.parse_args(argv)
    store_path = Path(tempfile.mkdtemp(prefix="l2c-bench-")) / "store.db"
    t0 = time.perf_counter()
    start_local_ray(num_cpus=2)
    handle = start_coordinator(store_path, data_dir=args.data_dir, idle_release_s=600, detached=False)
    print(f"local Ray + coordinator up in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        # Warm the gang with one job so the measured jobs all find it formed.
        warm = ray.get(handle.submit.remote({"name": "warm", **TINY}))
        _wait(handle, warm["experiment"])
        submitted = time.time()
        exp = ray.get(handle.submit.remote({"name": "tiny", **TINY, "sweep": {"seeds": list(range(args.jobs))}}))
        _wait(handle, exp["experiment"])
        store = Store(store_path)
        jobs = sorted(store.jobs(exp["experiment"]), key=lambda j: j["started_at"])
        gaps = [b["started_at"] - a["finished_at"] for a, b in zip(jobs, jobs[1:])]
        setup = [(j["finished_at"] - j["started_at"]) - store.result(j["id"])["final"]["train_s"] for j in jobs]
        print(f"jobs: {len(jobs)} tiny one-rank jobs on one warm gang, all {set(j['state'] for j in jobs)}")
        print(f"submit → first job start: {(jobs[0]['started_at'] - submitted) * 1e3:.1f} ms")
        print(f"job end → next job start: median {statistics.median(gaps) * 1e3:.1f} ms, "
              f"p90 {pct(gaps, 0.9) * 1e3:.1f} ms, max {max(gaps) * 1e3:.1f} ms")
        print(f"per job on the gang beyond training (worker set-up + reporting): median "
              f"{statistics.median(setup) * 1e3:.1f} ms")
        span = jobs[-1]["finished_at"] - jobs[0]["started_at"]
        print(f"throughput: {len(jobs) / span:.1f} jobs/s ({span / len(jobs) * 1e3:.0f} ms per job end to end)")

        t = time.perf_counter()
        lrs = [1e-3 * (1 + i / 1000) for i in range(args.sweep // 100)]
        huge = {"name": "huge", **TINY, "sweep": {"seeds": list(range(100)), "grid": {"optimizer.lr": lrs}}}
        big = ray.get(handle.submit.remote(huge), timeout=600)
        accept_s = time.perf_counter() - t
        pid = ray.get(handle.ping.remote())["pid"]
        rss = _rss_mib(pid)
        print(f"{args.sweep}-job sweep accepted in {accept_s:.2f} s; coordinator resident memory after it: "
              f"{rss:.0f} MiB", flush=True)
        # Scheduling with the whole sweep queued: every tick reads the queue; it must not validate each config.
        while len(ran := [j for j in store.jobs(big["experiment"]) if j["finished_at"]]) < 21:
            time.sleep(0.2)
        ran.sort(key=lambda j: j["started_at"])
        gaps = [b["started_at"] - a["finished_at"] for a, b in zip(ran, ran[1:])]
        print(f"job end → next job start with {args.sweep - len(ran)} jobs queued: median "
              f"{statistics.median(gaps) * 1e3:.1f} ms, p90 {pct(gaps, 0.9) * 1e3:.1f} ms")
        ray.get(handle.cancel.remote(big["experiment"]))
    finally:
        ray.get(handle.shutdown.remote(), timeout=30)
        ray.shutdown()
    return 0


def _wait(handle, experiment: str) -> None:
    while not all(j["state"] in ("succeeded", "failed", "diverged", "cancelled")
                  for j in ray.get(handle.status.remote(experiment))):
        time.sleep(0.05)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
