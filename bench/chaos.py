"""Chaos run: SIGKILL ranks and kill the coordinator while an experiment runs; count what was lost.

Starts a local Ray (127.0.0.1) with a coordinator, runs an experiment of small 1- and 2-rank jobs once without
interference (the twins), then runs the same configurations again while injecting rank kills (SIGKILL to a
random rank of a busy gang) and coordinator kills (Ray restarts it). With --max-pack K (default 4) the jobs train
in packs of up to K members, so a kill hits a whole pack, which must resume with the same members. Prints the
kills injected, the jobs finished, lost (never reaching a final state with a result: must be 0) and recorded
twice (more than one final state change: must be 0), and whether every job that was resumed ends with exactly
its twin's metrics.

    python bench/chaos.py --data-dir ../shared/data/mnist [--rank-kills 20] [--coordinator-kills 2] [--max-pack 4]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayError

from l2cluster.daemon import start_coordinator, start_local_ray
from l2cluster.store import Store

TERMINAL = {"succeeded", "failed", "diverged", "cancelled"}
TIMINGS = {"train_s", "epoch_s"}


def spec(name: str, jobs: int, epochs: int) -> dict:
    return {"name": name, "model": {"hidden_sizes": [32]},
            "data": {"batch_size": 20, "val_size": 500, "train_size": 2000},
            "optimizer": {"name": "adam", "lr": 0.003}, "regularizers": [{"name": "dropout", "p": 0.1}],
            "epochs": epochs, "max_attempts": 50,
            "sweep": {"seeds": list(range(jobs // 2)), "grid": {"scaling.num_workers": [1, 2]}}}


def call(handle, method, *args):
    """A coordinator call that waits out a coordinator restart."""
    for _ in range(600):
        try:
            return ray.get(getattr(handle, method).remote(*args), timeout=60)
        except RayActorError:
            time.sleep(0.2)
    raise RuntimeError(f"the coordinator did not come back for {method}")


def done(handle, experiment) -> bool:
    return all(j["state"] in TERMINAL for j in call(handle, "status", experiment))


def outcome(store: Store, job_id: str):
    result = store.result(job_id)
    if result is None:
        return None
    final = {k: v for k, v in result["final"].items() if k not in TIMINGS}
    epochs = [{k: v for k, v in e.items() if k not in TIMINGS} for e in store.epochs(job_id)]
    return result["outcome"], final, epochs


def close(a, b, rel: float = 1e-4) -> bool:
    """Two outcomes equal up to float32 rounding: the same outcome and epochs, every number within `rel`."""
    if a is None or b is None or a[0] != b[0] or len(a[2]) != len(b[2]):
        return False
    pairs = [(a[1], b[1]), *zip(a[2], b[2])]
    return all(math.isclose(x[k], y[k], rel_tol=rel, abs_tol=1e-6) if isinstance(x[k], float) else x[k] == y[k]
               for x, y in pairs for k in x)


def progress(store: Store, gang: dict) -> int:
    """The epoch a gang's pack has reached (its members train in lockstep)."""
    return max(store.job(j)["epoch"] for j in gang["jobs"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir")
    p.add_argument("--jobs", type=int, default=16, help="jobs per experiment (half 1-rank, half 2-rank)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--rank-kills", type=int, default=20)
    p.add_argument("--coordinator-kills", type=int, default=2)
    p.add_argument("--every-s", type=float, default=1.0, help="pause between kill attempts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-pack", type=int, default=4, help="members per pack (1: every job alone)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    store_path = Path(tempfile.mkdtemp(prefix="l2c-chaos-")) / "store.db"
    start_local_ray(num_cpus=4)
    handle = start_coordinator(store_path, data_dir=args.data_dir, idle_release_s=600, detached=False,
                               max_pack=args.max_pack)
    store = Store(store_path)
    try:
        t0 = time.perf_counter()
        twin_exp = call(handle, "submit", spec("twin", args.jobs, args.epochs))["experiment"]
        while not done(handle, twin_exp):
            time.sleep(0.2)
        print(f"twins: {args.jobs} jobs without interference in {time.perf_counter() - t0:.1f} s", flush=True)
        twins = {(j["seed"], tuple(sorted(j["overrides"].items()))): j["job"] for j in call(handle, "status", twin_exp)}

        t0 = time.perf_counter()
        exp = call(handle, "submit", spec("chaos", args.jobs, args.epochs))["experiment"]
        rank_kills = coordinator_kills = 0
        last_kill_epoch: dict[str, int] = {}
        # Coordinator kills are spread among the rank kills.
        coordinator_at = {round((i + 1) * args.rank_kills / (args.coordinator_kills + 1))
                          for i in range(args.coordinator_kills)}
        while not done(handle, exp):
            time.sleep(args.every_s)
            if coordinator_kills < args.coordinator_kills and rank_kills in coordinator_at:
                ray.kill(handle, no_restart=False)
                coordinator_kills += 1
                coordinator_at.discard(rank_kills)
                print(f"  killed the coordinator ({coordinator_kills})", flush=True)
                continue
            if rank_kills >= args.rank_kills:
                continue
            # Kill mid-run: a job past its first checkpoint (so it must resume, not restart) that has made progress
            # since it was last killed; jobs not yet killed first, so the kills spread over the experiment.
            busy = [g for g in call(handle, "gangs_info") if g["busy"] and g["jobs"] and g["ranks"]
                    and progress(store, g) > max(0, last_kill_epoch.get(g["job"], 0))]
            if not busy:
                continue
            fresh = [g for g in busy if g["job"] not in last_kill_epoch]
            gang = rng.choice(fresh or busy)
            last_kill_epoch[gang["job"]] = epoch = progress(store, gang)
            rank = rng.choice(gang["ranks"])
            try:
                os.kill(rank["pid"], signal.SIGKILL)
            except ProcessLookupError:
                continue
            rank_kills += 1
            print(f"  SIGKILL rank {rank['rank']} (pid {rank['pid']}) of pack {gang['job'][:8]} "
                  f"({len(gang['jobs'])} job(s)) after epoch {epoch}", flush=True)
        wall = time.perf_counter() - t0

        jobs = call(handle, "status", exp)
        finished = [j for j in jobs if j["state"] in TERMINAL and store.result(j["job"]) is not None]
        twice = [j["job"] for j in jobs
                 if sum(e["new_state"] in TERMINAL for e in store.events(j["job"])) > 1]
        resumed = [j for j in jobs if j["attempts"] > 1]
        from_checkpoint = [j for j in resumed if any((e["detail"] or "").startswith("resumed from the checkpoint")
                                                     for e in store.events(j["job"]))]
        twin_of = {j["job"]: twins[(j["seed"], tuple(sorted(j["overrides"].items())))] for j in jobs}
        size = lambda job_id: len(store.pack_members(store.job(job_id)["pack_id"]) or [job_id])  # noqa: E731
        # A job packed with as many members as its twin must end bit for bit as the twin. One that the scheduler
        # packed differently (pack sizes follow the queue, which kills change) runs other float32 kernels: it
        # must agree to rounding only.
        same_size = [j["job"] for j in jobs if size(j["job"]) == size(twin_of[j["job"]])]
        mismatched = [j for j in same_size if outcome(store, j) != outcome(store, twin_of[j])]
        other_size = [j["job"] for j in jobs if j["job"] not in same_size]
        far = [j for j in other_size if not close(outcome(store, j), outcome(store, twin_of[j]))]
        states = {}
        for j in jobs:
            states[j["state"]] = states.get(j["state"], 0) + 1
        packs = {j["pack"] for j in jobs}
        print(f"chaos: {len(jobs)} jobs (1- and 2-rank) in {len(packs)} pack(s) of up to {args.max_pack} in "
              f"{wall:.1f} s")
        print(f"kills injected: {rank_kills} rank SIGKILLs, {coordinator_kills} coordinator kills")
        print(f"jobs finished: {len(finished)} ({states}); jobs lost: {len(jobs) - len(finished)}; "
              f"jobs recorded twice: {len(twice)}")
        print(f"packs whose ranks were killed: {len(last_kill_epoch)}; jobs resumed: {len(resumed)} (attempts > 1), "
              f"{len(from_checkpoint)} of them from a checkpoint; "
              f"max attempts of a job: {max(j['attempts'] for j in jobs)}")
        print(f"jobs in a pack of their twin's size whose final and per-epoch metrics equal the twin's bit for bit: "
              f"{len(same_size) - len(mismatched)} of {len(same_size)}"
              + (f" (differ: {mismatched})" if mismatched else ""))
        print(f"jobs packed differently from their twin, equal to rounding (rel 1e-4): {len(other_size) - len(far)} "
              f"of {len(other_size)}" + (f" (differ: {far})" if far else ""))
        ok = not mismatched and not far and not twice and len(finished) == len(jobs)
    finally:
        with contextlib.suppress(RayError):
            ray.get(handle.shutdown.remote(), timeout=30)
        ray.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
