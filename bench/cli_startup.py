"""How fast the `l2cluster` command answers: median wall time of commands that only read, against `import torch`
(what every command paid before they stopped importing it).

    .venv/bin/python bench/cli_startup.py [--store STORE.db] [--repeat 5]

Without --store it builds a small store (one experiment of 9 ended jobs) in a temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def small_store(folder: Path) -> tuple[str, str, str]:
    """A store with the test suite's 9-job experiment (tests/test_aggregate.py), all ended."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support import registry
    from test_aggregate import SPEC, _fill

    from l2cluster.results.store import Store
    from l2cluster.spec import expand, parse_spec

    store = Store(folder / "store.db")
    jobs = expand(parse_spec(SPEC, registry()), registry())
    store.add_experiment("agg-1a2b3c4d", "agg", SPEC, jobs)
    _fill(store, jobs)
    store.close()
    return str(folder / "store.db"), "agg", jobs[0].id[:8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store")
    parser.add_argument("--experiment", help="with --store: an experiment id (prefix) in it")
    parser.add_argument("--job", help="with --store: a job id (prefix) in it")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store, experiment, job = (args.store, args.experiment, args.job) if args.store else small_store(Path(tmp))
        cli = [sys.executable, "-m", "l2cluster.cli"]
        cases = [
            ("l2cluster --help", [*cli, "--help"]),
            ("l2cluster --version", [*cli, "--version"]),
            ("l2cluster status --store", [*cli, "status", "--store", store]),
            ("l2cluster results EXP --store", [*cli, "results", experiment, "--store", store]),
            ("l2cluster logs JOB --store", [*cli, "logs", job, "--store", store]),
            ("python -c 'import torch' (the old floor)", [sys.executable, "-c", "import torch"]),
        ]
        print(f"median of {args.repeat} runs, {sys.platform}, python {sys.version.split()[0]}")
        for name, argv in cases:
            print(f"{name:45s} {timed(argv, args.repeat):6.2f} s")


if __name__ == "__main__":
    main()
