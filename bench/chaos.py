"""Chaos run: ≥ 100 injected faults of four kinds while experiments train; count, per kind, what was lost.

Starts a three-node Ray cluster on this machine (ray.cluster_utils: a head and two worker nodes, 127.0.0.1) with a
coordinator whose checkpoint directory is a small tmpfs, trains an experiment of small 1- and 2-rank jobs once
without interference (the twins), then trains the same configurations again, round after round, while it injects
faults until `--faults` of them have been injected:

- rank: SIGKILL a random rank of a busy gang (after its pack has made progress since the last kill);
- coordinator: kill the coordinator actor (Ray restarts it; it re-queues what was in flight);
- node: remove a worker node that holds a busy gang's rank, then add a fresh node in its place;
- disk: fill the checkpoint tmpfs to the last byte for a few seconds (checkpoints fail with ENOSPC), then free it.

With --max-pack K (default 4) jobs train in packs of up to K members, so a fault hits a whole pack. Prints a table:
for each kind, the faults injected and the jobs they hit: finished (a final state with a result), lost (none:
must be 0), recorded twice (more than one final state: must be 0), and equal to their undisturbed twin: bit for bit
when the job sits at the same index of a pack of the same size as its twin, else to float32 rounding (the queue,
which the faults change, decides who is packed with whom, and a member's float32 rounding depends on its place in
the stack). Disk faults need root (mount); without it they are skipped and said so.

    python bench/chaos.py --data-dir ../shared/data/mnist [--faults 100] [--jobs 16] [--epochs 8] [--max-pack 4]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.exceptions import RayActorError, RayError

from l2cluster.cluster.daemon import NAMESPACE, start_coordinator
from l2cluster.results.store import Store

TERMINAL = {"succeeded", "failed", "diverged", "cancelled"}
TIMINGS = {"train_s", "epoch_s"}
KINDS = ("rank", "coordinator", "node", "disk")
SHARES = {"rank": 0.70, "coordinator": 0.06, "node": 0.08, "disk": 0.16}
NODE_CPUS = 2


def spec(name: str, jobs: int, epochs: int) -> dict:
    return {"name": name, "model": {"hidden_sizes": [32]},
            "data": {"batch_size": 20, "val_size": 500, "train_size": 2000},
            "optimizer": {"name": "adam", "lr": 0.003}, "regularizers": [{"name": "dropout", "p": 0.1}],
            "epochs": epochs, "max_attempts": 100,
            "sweep": {"seeds": list(range(jobs // 2)), "grid": {"scaling.num_workers": [1, 2]}}}


def call(handle, method, *args):
    """A coordinator call that waits out a coordinator restart."""
    for _ in range(600):
        try:
            return ray.get(getattr(handle, method).remote(*args), timeout=60)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.2)
    raise RuntimeError(f"the coordinator did not come back for {method}")


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


class Disk:
    """The checkpoint directory on a small tmpfs of its own, which `fill` fills to the last byte."""

    def __init__(self, path: Path, size_mb: int):
        self.path = path
        path.mkdir(parents=True)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path)],
                                 capture_output=True, text=True)
        self.ok = mounted.returncode == 0
        self.why = mounted.stderr.strip()
        self.filler = path / ".filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            block = b"\0" * (1 << 20)
            while block:
                try:
                    os.write(fd, block)  # unbuffered: no data left to flush (and fail) at close
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    block = block[:len(block) // 16]
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.ok:
            subprocess.run(["umount", "-l", str(self.path)], check=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir")
    p.add_argument("--faults", type=int, default=100, help="faults to inject in all (default 100)")
    p.add_argument("--jobs", type=int, default=16, help="jobs per experiment (half 1-rank, half 2-rank)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--every-s", type=float, default=0.7, help="pause between faults")
    p.add_argument("--disk-hold-s", type=float, default=2.5, help="how long a disk fault keeps the disk full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-pack", type=int, default=4, help="members per pack (1: every job alone)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway cluster on 127.0.0.1
    work = Path(tempfile.mkdtemp(prefix="l2c-chaos-"))
    disk = Disk(work / "checkpoints", size_mb=64)
    kinds = [k for k in KINDS if k != "disk" or disk.ok]
    plan = [k for k in kinds for _ in range(round(args.faults * SHARES[k] / sum(SHARES[x] for x in kinds)))]
    plan += ["rank"] * (args.faults - len(plan))
    rng.shuffle(plan)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS})
    for _ in range(2):
        cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
    store_path = work / "store.db"
    handle = start_coordinator(store_path, data_dir=args.data_dir, idle_release_s=600, detached=False,
                               max_pack=args.max_pack, checkpoint_dir=str(disk.path))
    store = Store.open_read_only(store_path)
    injected: dict[str, int] = defaultdict(int)
    hit: dict[str, set[str]] = defaultdict(set)  # kind → jobs it hit
    ok = False
    try:
        t0 = time.perf_counter()
        twin_exp = call(handle, "submit", spec("twin", args.jobs, args.epochs))["experiment"]
        while not all(j["state"] in TERMINAL for j in call(handle, "status", twin_exp)):
            time.sleep(0.2)
        print(f"twins: {args.jobs} jobs without interference in {time.perf_counter() - t0:.1f} s", flush=True)
        key = lambda j: (j["seed"], tuple(sorted(j["overrides"].items())))  # noqa: E731
        twins = {key(j): j["job"] for j in call(handle, "status", twin_exp)}

        t0, experiments, last_kill = time.perf_counter(), [], {}
        while plan:
            exp = call(handle, "submit", spec(f"chaos-{len(experiments)}", args.jobs, args.epochs))["experiment"]
            experiments.append(exp)
            print(f"round {len(experiments)}: {exp}", flush=True)
            while plan and not all(j["state"] in TERMINAL for j in call(handle, "status", exp)):
                time.sleep(args.every_s)
                kind = plan[0]
                running = [j["job"] for j in call(handle, "status", exp) if j["state"] == "running"]
                if not running:
                    continue
                busy = [g for g in call(handle, "gangs_info") if g["busy"] and g["jobs"] and g["ranks"]]
                if kind == "coordinator":
                    ray.kill(handle, no_restart=False)
                    what = "killed the coordinator"
                    hit[kind].update(running)
                elif kind == "disk":
                    disk.fill()
                    time.sleep(args.disk_hold_s)
                    running += [j["job"] for j in call(handle, "status", exp) if j["state"] == "running"]
                    disk.free()
                    what = f"checkpoint disk full for {args.disk_hold_s:g} s"
                    hit[kind].update(running)
                elif kind == "rank":
                    # Mid-run: a pack that has made progress since it was last hit; packs not yet hit first.
                    ready = [g for g in busy if progress(store, g) > last_kill.get(g["job"], 0)]
                    if not ready:
                        continue
                    gang = rng.choice([g for g in ready if g["job"] not in last_kill] or ready)
                    last_kill[gang["job"]] = progress(store, gang)
                    rank = rng.choice(gang["ranks"])
                    try:
                        os.kill(rank["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    what = f"SIGKILL rank {rank['rank']} of pack {gang['job'][:8]} ({len(gang['jobs'])} job(s))"
                    hit[kind].update(gang["jobs"])
                else:  # node
                    workers = {n.node_id[:6]: n for n in cluster.worker_nodes}
                    on = [(g, workers[r["node"].rsplit("/", 1)[1]]) for g in busy for r in g["ranks"]
                          if r["node"].rsplit("/", 1)[1] in workers]
                    if not on:
                        continue
                    gang, node = rng.choice(on)
                    doomed = [j for g in busy for r in g["ranks"] if r["node"].endswith(node.node_id[:6])
                              for j in g["jobs"]]
                    cluster.remove_node(node, allow_graceful=False)
                    cluster.add_node(num_cpus=NODE_CPUS)
                    what = f"removed node {node.node_id[:6]} ({len(set(doomed))} job(s) on it), added a new one"
                    hit[kind].update(doomed)
                plan.pop(0)
                injected[kind] += 1
                print(f"  fault {sum(injected.values())}: {what}", flush=True)
            while not all(j["state"] in TERMINAL for j in call(handle, "status", exp)):
                time.sleep(0.5)
        wall = time.perf_counter() - t0

        jobs = [j for exp in experiments for j in call(handle, "status", exp)]
        twin_of = {j["job"]: twins[key(j)] for j in jobs}

        def place(job_id: str) -> tuple[int, int]:
            """(pack size, the job's index in it): float32 rounding in a stacked model depends on both."""
            members = store.pack_members(store.job(job_id)["pack_id"]) or [job_id]
            return len(members), members.index(job_id)


        def verdict(job_id: str) -> dict:
            finished = store.job(job_id)["state"] in TERMINAL and store.result(job_id) is not None
            twice = sum(e["new_state"] in TERMINAL for e in store.events(job_id)) > 1
            a, b = outcome(store, job_id), outcome(store, twin_of[job_id])
            equal = a == b if place(job_id) == place(twin_of[job_id]) else close(a, b)
            return {"finished": finished, "twice": twice, "equal": equal}

        verdicts = {j["job"]: verdict(j["job"]) for j in jobs}
        print(f"\n{len(experiments)} round(s) of {args.jobs} jobs (1- and 2-rank, packs of up to {args.max_pack}, "
              f"{args.epochs} epochs) on 3 nodes in {wall:.1f} s; {sum(injected.values())} faults injected")
        if not disk.ok:
            print(f"disk faults skipped: cannot mount a tmpfs ({disk.why})")
        header = ("fault", "injected", "jobs hit", "finished", "lost", "recorded twice", "equal to twin")
        rows = []
        for kind in [*kinds, "all jobs"]:
            ids = set(verdicts) if kind == "all jobs" else hit[kind]
            v = [verdicts[j] for j in ids if j in verdicts]
            rows.append((kind, str(sum(injected.values())) if kind == "all jobs" else str(injected[kind]),
                         str(len(v)), str(sum(x["finished"] for x in v)), str(sum(not x["finished"] for x in v)),
                         str(sum(x["twice"] for x in v)), f"{sum(x['equal'] for x in v)} of {len(v)}"))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        attempts = [store.job(j)["attempts"] for j in verdicts]
        print(f"attempts per job: max {max(attempts)}, mean {sum(attempts) / len(attempts):.1f}")
        ok = all(v["finished"] and not v["twice"] and v["equal"] for v in verdicts.values())
    finally:
        with contextlib.suppress(RayError):
            ray.get(handle.shutdown.remote(), timeout=30)
        ray.shutdown()
        cluster.shutdown()
        disk.unmount()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
