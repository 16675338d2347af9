"""Benchmark: one spec through a running daemon, submit → result, as a user's `submit --wait` sees it.

Connects to the daemon (`--address`, RAY_ADDRESS, or the local daemon from `l2cluster daemon start`), submits
the spec (optionally with other seeds), polls the coordinator every 20 ms, and prints per job: submit → start
(placement, including forming a gang when none is warm), start → end (time on the gang) and its training time,
then submit → last result and the jobs' test accuracies. Run it twice to see a cold and then a warm gang:

    l2cluster daemon start --data-dir DIR
    python bench/daemon_submit.py jobs/reference.yaml --seeds 0      # forms the gang
    python bench/daemon_submit.py jobs/reference.yaml --seeds 1 2    # reuses it
"""

from __future__ import annotations

import argparse
import sys
import time

import ray

from l2cluster.cluster import daemon
from l2cluster.spec import read_spec_file

TERMINAL = ("succeeded", "failed", "diverged", "cancelled")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec")
    p.add_argument("--seeds", type=int, nargs="+", help="replace the spec's sweep seeds")
    p.add_argument("--address")
    args = p.parse_args(argv)
    spec = read_spec_file(args.spec)
    if args.seeds:
        spec.setdefault("sweep", {})["seeds"] = args.seeds
    daemon.connect(args.address)
    coordinator = daemon.coordinator()
    submitted = time.time()
    exp = ray.get(coordinator.submit.remote(spec, 0, args.spec))["experiment"]
    while True:
        jobs = ray.get(coordinator.results.remote(exp))
        if all(j["state"] in TERMINAL for j in jobs):
            break
        time.sleep(0.02)
    done = time.time()
    total = ray.cluster_resources()
    print(f"{exp}: {len(jobs)} job(s) on a cluster of {total.get('CPU', 0):g} CPU(s), {total.get('GPU', 0):g} GPU(s)")
    for j in sorted(jobs, key=lambda j: j["started_at"] or 0):
        final = (j["result"] or {}).get("final") or {}
        print(f"  {j['job']} seed {j['seed']}: {j['state']} on {j['node']}; submit → start "
              f"{j['started_at'] - submitted:.2f} s, on the gang {j['finished_at'] - j['started_at']:.2f} s "
              f"(training {final.get('train_s', float('nan')):.2f} s, {final.get('epochs_run')} epochs), "
              f"test_acc {final.get('test_acc', float('nan')):.4f}")
    print(f"submit → last result: {done - submitted:.2f} s")
    return 0 if all(j["state"] == "succeeded" for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
