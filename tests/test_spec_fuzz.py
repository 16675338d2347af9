"""Fuzzing spec validation: 1,000 specs, each broken in one way (wrong types, out-of-range values, unknown fields
and plugins, bad sweep paths, empty and too-large sweeps, unsafe names, values that are not plain data, broken
YAML and JSON), each refused by `l2cluster validate` with exit code 2, no traceback and a message naming the field.
The strategies live in spec_fuzz.py (shared with bench/fuzz_specs.py)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from spec_fuzz import Case, clean_refusal, invalid_specs, names_field, valid_specs, validate_in_process
from support import run_cli

ROOT = Path(__file__).resolve().parents[1]
_FUZZ = settings(deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.large_base_example])


def test_the_oracle_can_tell_a_clean_refusal_from_a_bad_one():
    case = Case("t", b"", ".yaml", ("optimizer.lr",))
    good = "spec.yaml: invalid job spec (1 problem)\n  optimizer.lr\n    Input should be greater than 0\n"
    assert clean_refusal(2, good, case) is None
    assert clean_refusal(0, good, case) == "exit code 0, expected 2"
    assert clean_refusal(1, "Traceback (most recent call last):\n" + good, case) == "exit code 1, expected 2"
    assert clean_refusal(2, "Traceback (most recent call last):\n" + good, case) == "printed a traceback"
    assert clean_refusal(2, "", case) == "printed no error"
    other = "spec.yaml: invalid job spec (1 problem)\n  optimizer.lrs\n    unknown field\n"
    assert clean_refusal(2, other, case) == "does not name optimizer.lr"
    assert names_field("  regularizers[0].strength\n    too big", "regularizers[0]")
    assert not names_field("  regularizers[1]\n    bad", "regularizers[0]")
    assert names_field("  (top level)\n    optimizer.weight_decay=0.1 together with", "optimizer.weight_decay")
    assert names_field("  (top level)\n    line 3, column 5: not valid YAML: …", "line")
    assert not names_field("  (top level)\n    not valid YAML", "line")


@settings(_FUZZ, max_examples=60)
@given(spec=valid_specs())
def test_the_specs_the_fuzzer_breaks_are_valid_to_begin_with(spec, tmp_path_factory):
    # Each invalid spec is one of these with one thing broken: the refusal is about that one thing.
    case = Case("valid", yaml.safe_dump(spec).encode(), ".yaml", ())
    code, err = validate_in_process(case, tmp_path_factory.getbasetemp())
    assert code == 0, err


@pytest.mark.slow
def test_a_thousand_invalid_specs_are_each_refused_cleanly(tmp_path):
    kinds: Counter[str] = Counter()

    @settings(_FUZZ, max_examples=1000)
    @given(case=invalid_specs())
    def refused_cleanly(case):
        kinds[case.kind] += 1
        code, err = validate_in_process(case, tmp_path)
        why = clean_refusal(code, err, case)
        assert why is None, f"{case.describe()}\n{why}:\n{err[-3000:]}"

    refused_cleanly()
    assert sum(kinds.values()) >= 1000
    # What the issue lists, each many times over.
    for kind in ("wrong_type", "out_of_range", "unknown_field", "unknown_plugin", "bad_sweep_path", "empty_grid",
                 "too_many_jobs", "yaml_syntax"):
        assert kinds[kind] >= 10, kinds


@pytest.mark.parametrize("content, suffix, args, named", [
    (b"name: t\noptimizer: {name: adam, lr: [1, 2}\n", ".yaml", [], "line 2, column"),
    (b"name: t\noptimizer: {name: adam}\nsweep: {grid: {optimizer.lr: [0.1, 0.2, 0.3]}, seeds: [1, 2]}\n", ".yaml",
     ["--max-jobs", "5"], "expands to 6 jobs, more than the limit of 5"),
    (b'{"name": "t", "optimizer": {"name": "adam"}, "regularizers": [{"name": "../../etc"}]}', ".json", [],
     "regularizers[0]"),
    (b"name: t\noptimizer: {name: adam}\ndescription: caf\xe9\n", ".yaml", [], "not UTF-8"),
], ids=["broken-yaml", "over-the-job-cap", "plugin-name-as-a-path", "not-utf8"])
def test_a_few_through_a_real_process(tmp_path, content, suffix, args, named):
    spec = tmp_path / f"spec{suffix}"
    spec.write_bytes(content)
    run = run_cli("validate", str(spec), *args, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert named in run.stderr, run.stderr
