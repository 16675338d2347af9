"""Fuzz spec validation: N invalid specs (default 2,000) through `l2cluster validate`, in this process.

Each spec is a valid one broken in exactly one way (tests/spec_fuzz.py, the same strategies the test suite uses);
it is refused cleanly when the command exits with code 2, prints no traceback, and names the broken field (or
the line, for broken YAML/JSON). Prints "fuzzed specs: tried N, refused cleanly M", the count per kind of
breakage, and every spec that was not refused cleanly.

    .venv/bin/python bench/fuzz_specs.py [-n 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # spec_fuzz lives with the tests

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from spec_fuzz import clean_refusal, invalid_specs, validate_in_process  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=2000, help="how many invalid specs to try")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: a random one)")
    args = p.parse_args()

    tried: Counter[str] = Counter()
    clean: Counter[str] = Counter()
    failures: list[str] = []
    directory = tempfile.mkdtemp(prefix="l2cluster-fuzz-")

    @settings(max_examples=args.n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=invalid_specs())
    def fuzz(case):
        tried[case.kind] += 1
        code, err = validate_in_process(case, directory)
        why = clean_refusal(code, err, case)
        if why is None:
            clean[case.kind] += 1
        else:
            failures.append(f"{case.describe()}\n  -> {why}\n{err[-2000:]}")

    if args.seed is not None:
        fuzz = seed(args.seed)(fuzz)
    t0 = time.perf_counter()
    fuzz()
    elapsed = time.perf_counter() - t0
    n, m = sum(tried.values()), sum(clean.values())
    for kind in sorted(tried):
        print(f"  {kind:<20} {clean[kind]:>5} / {tried[kind]:<5}", file=sys.stderr)
    for f in failures:
        print(f"\nNOT REFUSED CLEANLY: {f}")
    print(f"fuzzed specs: tried {n}, refused cleanly {m} ({elapsed:.0f} s)")
    return 0 if n == m else 1


if __name__ == "__main__":
    sys.exit(main())
