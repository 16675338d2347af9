"""Aggregation over seeds on known inputs: the Student t quantile against closed forms and tables, mean/sd/CI exactly
as the formulas say, and a real store's jobs grouped, summarized and ranked by validation accuracy."""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3

import pytest
from support import registry

from l2cluster.records import JobResult
from l2cluster.results.aggregate import (
    FieldError,
    betainc,
    compare,
    export_experiment,
    format_value,
    group_jobs,
    strength_axis,
    summarize,
    t_cdf,
    t_quantile,
    welch,
)
from l2cluster.results.report import render
from l2cluster.results.store import Store, StoreError
from l2cluster.spec import expand, parse_spec
from l2cluster.states import JobState, Outcome


# -- Student t ---------------------------------------------------------------------------------------------------
def _t_closed_form(p: float, df: int) -> float:
    """Closed forms of the t quantile for df = 1, 2, 4 (Hill 1970; Shaw 2006)."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    a = 4 * p * (1 - p)
    q = math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a)
    return math.copysign(2 * math.sqrt(q - 1), p - 0.5)


@pytest.mark.parametrize("df", [1, 2, 4])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.95, 0.975, 0.995, 0.9995, 0.025])
def test_t_quantile_matches_the_closed_forms(p, df):
    assert t_quantile(p, df) == pytest.approx(_t_closed_form(p, df), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("p, df, expected", [
    (0.975, 1, 12.7062047362), (0.975, 2, 4.3026527297), (0.975, 4, 2.7764451052), (0.975, 30, 2.0422724563),
    (0.975, 9, 2.2621571628), (0.995, 10, 3.1692726726), (0.95, 5, 2.0150483733), (0.975, 120, 1.9799304050),
])
def test_t_quantile_matches_published_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-9)


def test_t_quantile_tends_to_the_normal_and_inverts_the_cdf():
    assert t_quantile(0.975, 10**7) == pytest.approx(1.959963985, abs=1e-6)
    assert t_quantile(0.5, 3) == 0.0
    assert t_quantile(0.025, 5) == -t_quantile(0.975, 5)
    for df in (1, 3, 7, 50):
        for p in (0.55, 0.8, 0.99):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-13)
    assert t_cdf(0.0, 3) == 0.5
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-15)  # Cauchy: ½ + atan(1)/π
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.9, 0)


def test_betainc_special_cases():
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert betainc(1, 1, x) == pytest.approx(x, abs=1e-15)
        assert betainc(3.5, 1, x) == pytest.approx(x**3.5, abs=1e-14)
        assert betainc(1, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, abs=1e-14)
    assert betainc(0.5, 0.5, 0.25) == pytest.approx(2 / math.pi * math.asin(0.5), abs=1e-14)


# -- Welch's t-test ---------------------------------------------------------------------------------------------------
def _two_sided_p_by_integration(t: float, df: float, steps: int = 20000) -> float:
    """2·P(T > |t|) by Simpson's rule on the t density over [0, |t|] (independent of betainc)."""
    density = lambda x: math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)  # noqa: E731
                                 - 0.5 * math.log(df * math.pi) - (df + 1) / 2 * math.log1p(x * x / df))
    h = abs(t) / steps
    area = density(0) + density(abs(t)) + sum((4 if k % 2 else 2) * density(k * h) for k in range(1, steps))
    return 1 - 2 * area * h / 3


def test_welch_equal_sizes_gives_df_2_and_the_closed_form_p():
    # a = [1, 3], b = [4, 6]: means 2 and 5, variances 2 and 2; se² = 2/2 + 2/2 = 2, t = 3/√2,
    # df = 2² / (1²/1 + 1²/1) = 2; for df = 2, P(|T| > t) = 1 − t/√(2 + t²).
    w = welch([1.0, 3.0], [4.0, 6.0])
    t = 3 / math.sqrt(2)
    assert (w.delta, w.se) == (3.0, pytest.approx(math.sqrt(2), abs=1e-15))
    assert w.t == pytest.approx(t, abs=1e-14) and w.df == pytest.approx(2.0, abs=1e-14)
    assert w.p == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)  # 0.16795
    half = 4.302652729749464 * math.sqrt(2)  # t(0.975, 2)·se
    assert (w.ci_low, w.ci_high) == (pytest.approx(3 - half, abs=1e-9), pytest.approx(3 + half, abs=1e-9))


def test_welch_unequal_variances_and_sizes_by_hand():
    # a = [1, 2, 3]: mean 2, var 1; b = [2, 4, 6, 8]: mean 5, var 20/3. se² = 1/3 + 5/3 = 2, t = 3/√2,
    # df = 2² / ((1/3)²/2 + (5/3)²/3) = 4 / (1/18 + 25/27) = 216/53 ≈ 4.0755.
    w = welch([1, 2, 3], [2, 4, 6, 8])
    assert w.t == pytest.approx(3 / math.sqrt(2), abs=1e-14)
    assert w.df == pytest.approx(216 / 53, abs=1e-12)
    assert w.p == pytest.approx(_two_sided_p_by_integration(3 / math.sqrt(2), 216 / 53), abs=1e-9)
    assert 0.09 < w.p < 0.11
    # b − a: swapping the samples flips the sign, not the p.
    swapped = welch([2, 4, 6, 8], [1, 2, 3])
    assert (swapped.delta, swapped.t, swapped.p) == (-3.0, pytest.approx(-w.t), pytest.approx(w.p, abs=1e-15))


def test_welch_needs_two_values_each_and_some_spread():
    assert welch([], [1.0, 2.0]) is None
    one = welch([0.5], [0.6, 0.7])
    assert one.delta == pytest.approx(0.15) and (one.t, one.df, one.p) == (None, None, None)
    flat = welch([0.5, 0.5], [0.6, 0.6, None])  # no spread: a difference, but no test
    assert flat.delta == pytest.approx(0.1) and flat.se == 0.0 and flat.p is None
    assert welch([0.5, 0.7], [0.5, 0.7]).p == pytest.approx(1.0, abs=1e-15)


# -- mean, sd, CI ----------------------------------------------------------------------------------------------------
def test_summarize_is_mean_sample_sd_and_a_t_interval():
    s = summarize([0.97, 0.98, 0.99])
    half = 4.302652729749464 * 0.01 / math.sqrt(3)
    assert (s.n, s.mean, s.sd) == (3, pytest.approx(0.98, abs=1e-15), pytest.approx(0.01, abs=1e-15))
    assert s.ci_low == pytest.approx(0.98 - half, abs=1e-14) and s.ci_high == pytest.approx(0.98 + half, abs=1e-14)
    assert s.half_width == pytest.approx(half, abs=1e-14)
    two = summarize([1.0, 2.0])  # sd = 1/√2, half width = t(0.975, 1)·(1/√2)/√2 = 12.7062…/2
    assert two.sd == pytest.approx(math.sqrt(0.5)) and two.half_width == pytest.approx(12.706204736174707 / 2)
    assert summarize([0.5, None, float("nan")]) == summarize([0.5])
    one = summarize([0.5])
    assert (one.n, one.mean, one.sd, one.ci_low, one.ci_high) == (1, 0.5, None, None, None)
    assert summarize([]).mean is None


def test_format_value_writes_numbers_as_in_a_spec():
    assert [format_value(v) for v in (1e-4, 1e-5, 2.5e-4, 0.001, 0.5, 1.0, 0.0, 3, True)] == [
        "1e-4", "1e-5", "2.5e-4", "0.001", "0.5", "1", "0", "3", "true"]


# -- a real store ------------------------------------------------------------------------------------------------------
SPEC = {
    "name": "agg", "optimizer": {"name": "adam"}, "epochs": 3, "model": {"hidden_sizes": [8]},
    "sweep": {"seeds": [0, 1, 2], "variants": [
        {"label": "none", "set": {"regularizers": []}},
        {"label": "l2", "set": {"regularizers": [{"name": "l2"}]},
         "grid": {"regularizers.l2.strength": [1e-4, 1e-2]}},
    ]},
}
# Final val/test/train accuracy per (label, strength) and seed. l2 1e-4 has the best validation but the worst test
# accuracy: it must rank first. l2 1e-2 has the highest validation accuracy but one diverged seed: it ranks last.
OUTCOMES = {
    ("none", None): {"val": [0.960, 0.962, 0.964], "test": [0.970, 0.972, 0.974], "train": [0.99, 0.995, 1.0]},
    ("l2", 1e-4): {"val": [0.970, 0.971, 0.975], "test": [0.960, 0.961, 0.962], "train": [0.98, 0.98, 0.99]},
    ("l2", 1e-2): {"val": [0.990, 0.990, None], "test": [0.980, 0.985, None], "train": [0.99, 0.99, None]},
}


def _fill(store: Store, jobs, test_shift: float = 0.0) -> None:
    for job in jobs:
        key = (job.label, job.overrides.get("regularizers.l2.strength"))
        out = {k: v[job.seed] for k, v in OUTCOMES[key].items()}
        out["test"] = None if out["test"] is None else out["test"] + test_shift
        store.transition(job.id, JobState.PLACING)
        store.transition(job.id, JobState.RUNNING)
        if out["val"] is None:
            store.record_epoch(job.id, 1, {"epoch": 1, "val_acc": 0.5, "val_loss": 2.0, "train_loss": 2.5})
            store.record_epoch(job.id, 2, {"epoch": 2, "val_acc": 0.1, "val_loss": float("nan"), "train_loss": 9.0})
            store.finish(job.id, JobResult(Outcome.DIVERGED, {"test_acc": None, "val_acc": 0.1}, diverged_epoch=2,
                                           error="loss became non-finite in epoch 2"))
            continue
        # Validation peaks in epoch 2 (0.005 above the final value); losses fall by a known amount per epoch.
        for epoch, dv in ((1, -0.01), (2, 0.005), (3, 0.0)):
            store.record_epoch(job.id, epoch, {"epoch": epoch, "val_acc": out["val"] + dv, "train_loss": 1.0 / epoch,
                                               "val_loss": 1.2 / epoch + 0.01 * job.seed})
        final = {"val_acc": out["val"], "val_loss": 0.4 + 0.01 * job.seed, "test_acc": out["test"],
                 "test_loss": 1 - out["test"], "train_acc": out["train"], "train_loss": 0.3,
                 "weight_norm": 10.0 + job.seed, "best_val_acc": None, "best_epoch": None, "epochs_run": 3}
        store.finish(job.id, JobResult(Outcome.SUCCEEDED, final))


@pytest.fixture
def store_with_experiment(tmp_path):
    store = Store(tmp_path / "store.db")
    jobs = expand(parse_spec(SPEC, registry()), registry())
    store.add_experiment("agg-1", "agg", SPEC, jobs)
    yield store, jobs
    store.close()


def test_groups_summarize_the_stored_numbers_and_rank_by_validation(store_with_experiment):
    store, jobs = store_with_experiment
    pending = group_jobs(export_experiment(store, "agg-1"))
    assert [(g.num_pending, g.num_succeeded, g.val_acc.mean) for g in pending] == [(3, 0, None)] * 3
    _fill(store, jobs)
    groups = group_jobs(export_experiment(store, "agg-1"))
    assert [g.name for g in groups] == ["l2 strength=1e-4", "none", "l2 strength=0.01"]
    assert [g.rank for g in groups] == [1, 2, 3]
    top, none, diverged = groups

    half3 = 4.302652729749464 / math.sqrt(3)
    assert (top.num_jobs, top.num_succeeded, top.seeds) == (3, 3, [0, 1, 2])
    assert top.test_acc.mean == pytest.approx(0.961, abs=1e-15)
    assert top.test_acc.sd == pytest.approx(0.001, abs=1e-15)
    assert top.test_acc.half_width == pytest.approx(0.001 * half3, abs=1e-14)
    assert top.val_acc.mean == pytest.approx(0.972, abs=1e-15)
    sd_val = math.sqrt(((0.970 - 0.972) ** 2 + (0.971 - 0.972) ** 2 + (0.975 - 0.972) ** 2) / 2)
    assert top.val_acc.sd == pytest.approx(sd_val, abs=1e-15)
    assert top.test_loss.mean == pytest.approx(0.039, abs=1e-15)
    # Best validation accuracy comes from the per-epoch rows (the stored final leaves it empty here).
    assert top.best_val_acc.mean == pytest.approx(0.977, abs=1e-15) and top.best_epoch == 2
    gaps = [0.98 - 0.960, 0.98 - 0.961, 0.99 - 0.962]
    assert top.gap.mean == pytest.approx(sum(gaps) / 3, abs=1e-15)
    assert top.gap.sd == pytest.approx(summarize(gaps).sd, abs=1e-15)
    assert top.weight_norm.mean == pytest.approx(11.0) and top.weight_norm.sd == pytest.approx(1.0)
    means = ("epoch", "n", "train_loss", "val_loss", "train_acc", "val_acc")
    assert [{k: c[k] for k in means} for c in top.curves] == [
        {"epoch": e, "n": 3, "train_loss": pytest.approx(1 / e), "val_loss": pytest.approx(1.2 / e + 0.01),
         "train_acc": None, "val_acc": pytest.approx(0.972 + dv)} for e, dv in ((1, -0.01), (2, 0.005), (3, 0.0))]
    # The seed band: the seeds' validation losses are 1.2/e + 0.01·seed, so min, max and sd are known.
    assert (top.curves[0]["val_loss_min"], top.curves[0]["val_loss_max"]) == (pytest.approx(1.2), pytest.approx(1.22))
    assert top.curves[0]["val_loss_sd"] == pytest.approx(0.01) and top.curves[0]["lr_min"] is None
    assert [r["test_acc"] for r in top.per_seed] == [0.960, 0.961, 0.962] and top.regularizers == "l2"
    assert (top.axis.series, top.axis.knob, top.axis.x) == ("l2", "l2 strength", 1e-4)

    assert none.axis.x is None and none.axis.series == "none" and none.test_acc.mean == pytest.approx(0.972)
    assert (diverged.num_diverged, diverged.num_succeeded, diverged.seeds) == (1, 2, [0, 1])
    assert diverged.val_acc.mean == pytest.approx(0.99) and diverged.val_acc.sd == 0.0
    assert diverged.test_acc.mean == pytest.approx(0.9825)


def test_by_field_regroups_and_unknown_fields_are_refused(store_with_experiment):
    store, jobs = store_with_experiment
    _fill(store, jobs)
    export = export_experiment(store, "agg-1")
    by_label = group_jobs(export, ["label"])
    assert [(g.label, g.num_jobs, g.num_succeeded) for g in by_label] == [("none", 3, 3), ("l2", 6, 5)]
    by_seed = group_jobs(export, ["seed"])
    assert sorted((g.overrides["seed"], g.num_jobs) for g in by_seed) == [(0, 3), (1, 3), (2, 3)]
    by_strength = group_jobs(export, ["regularizers.l2.strength"])
    assert sorted(g.settings for g in by_strength) == ["strength=-", "strength=0.01", "strength=1e-4"]
    with pytest.raises(FieldError, match=r"--by optimizer\.lrr: no job of agg-1 has this field; use one of"):
        group_jobs(export, ["optimizer.lrr"])
    with pytest.raises(KeyError, match="no experiment 'nope'; recent: agg-1"):
        export_experiment(store, "nope")


def test_formats_carry_the_same_numbers(store_with_experiment):
    store, jobs = store_with_experiment
    _fill(store, jobs)
    groups = group_jobs(export_experiment(store, "agg-1"))
    table = render([groups], "table", ["agg-1"]).splitlines()
    assert table[0].split()[:3] == ["rank", "configuration", "n"]
    assert table[2].startswith("1     l2 strength=1e-4") and "96.10 ± 0.25" in table[2]
    assert "2/3" in table[4]  # n: succeeded of all seeds, for the diverged configuration
    md = render([groups], "markdown", ["agg-1"]).splitlines()
    assert md[1].startswith("| --- |") and md[2].startswith("| 1 | l2 strength=1e-4 | 3 | 97.20 | 96.10 ± 0.25 |")
    rows = list(csv.DictReader(io.StringIO(render([groups], "csv", ["agg-1"]))))
    assert [r["configuration"] for r in rows] == [g.name for g in groups]
    assert float(rows[0]["test_acc_ci95_high"]) == pytest.approx(groups[0].test_acc.ci_high, rel=1e-15)
    assert rows[0]["strength"] == "0.0001" and rows[1]["strength"] == ""
    data = json.loads(render([groups], "json", ["agg-1"]))
    assert data[0]["test_acc"]["mean"] == pytest.approx(0.961) and data[0]["rank"] == 1
    with pytest.raises(ValueError, match="--format xml"):
        render([groups], "xml", ["agg-1"])


def test_experiments_compare_side_by_side_matched_by_configuration(store_with_experiment):
    store, jobs = store_with_experiment
    _fill(store, jobs)
    first = group_jobs(export_experiment(store, "agg-1"))
    small = {**SPEC, "name": "agg-small", "sweep": {**SPEC["sweep"], "variants": SPEC["sweep"]["variants"][:1]}}
    small_jobs = expand(parse_spec(small, registry()), registry())
    store.add_experiment("agg-2", "agg-small", small, small_jobs)
    _fill(store, small_jobs, test_shift=0.005)
    second = group_jobs(export_experiment(store, "agg-2"))
    rows = compare([first, second])
    assert [r["name"] for r in rows] == ["l2 strength=1e-4", "none", "l2 strength=0.01"]
    assert rows[1]["groups"][1].experiment == "agg-2" and rows[0]["groups"][1] is None
    text = render([first, second], "table", ["agg-1", "agg-2"]).splitlines()
    assert text[0] == "[1] agg-1  [2] agg-2"
    assert "n [2]" in text[1] and text[1].split()[-5:] == ["pp", "[2]−[1]", "t", "df", "p"]
    assert text[3].split()[-9:] == ["-", "-", "-", "only", "in", "[1]", "-", "-", "-"]  # [2] has no l2
    # none: test accuracies [0.970, 0.972, 0.974] and the same + 0.005; sd 0.002 each, so se = 0.002·√(2/3),
    # t = 0.005/se = 3.0619, df = 4 (equal sizes and variances), p = 0.0376.
    t = 0.005 / (0.002 * math.sqrt(2 / 3))
    p = _two_sided_p_by_integration(t, 4)
    assert text[4].split()[-4:] == ["+0.50", f"{t:.2f}", "4.0", f"{p:.2g}"] == ["+0.50", "3.06", "4.0", "0.038"]


def test_strength_axis_is_derived_from_the_swept_setting():
    cfg = {"regularizers": [{"name": "dropout", "p": 0.2}]}
    assert strength_axis("dropout", {"regularizers.dropout.p": 0.2}, cfg).__dict__ == {
        "series": "dropout", "knob": "dropout p", "x": 0.2}
    # By index, and with another swept setting that becomes part of the series.
    axis = strength_axis("", {"regularizers.0.p": 0.3, "optimizer.lr": 0.01}, cfg)
    assert (axis.series, axis.knob, axis.x) == ("dropout lr=0.01", "dropout p", 0.3)
    # A strength of 0 is a reference; no regularizer is a reference; a non-regularizer sweep is x.
    assert strength_axis("", {"regularizers.l2.strength": 0.0}, {"regularizers": [{"name": "l2"}]}).x is None
    assert strength_axis("none", {}, {"regularizers": []}).__dict__ == {"series": "none", "knob": None, "x": None}
    assert strength_axis("", {"optimizer.lr": 0.003}, cfg).__dict__ == {
        "series": "dropout", "knob": "optimizer.lr", "x": 0.003}
    assert strength_axis("", {"optimizer.lr": 0.003}, {"regularizers": []}).__dict__ == {
        "series": "none", "knob": "optimizer.lr", "x": 0.003}
    assert strength_axis("", {"regularizers.l2.strength": 0.0}, {"regularizers": [{"name": "l2"}]}).__dict__ == {
        "series": "l2 strength=0", "knob": "l2 strength", "x": None}


def test_a_store_opened_read_only_reads_beside_the_writer_and_never_writes(store_with_experiment, tmp_path):
    store, jobs = store_with_experiment
    _fill(store, jobs)
    reader = Store.open_read_only(store.path)
    assert len(export_experiment(reader, "agg-1")["jobs"]) == 9
    store.add_experiment("agg-3", "agg", SPEC, [])  # the writer keeps writing; the reader sees it
    assert reader.experiment("agg-3") is not None
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader._db.execute("DELETE FROM jobs")
    reader.close()
    with pytest.raises(StoreError, match="no such store file"):
        Store.open_read_only(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a readable l2cluster store"):
        Store.open_read_only(tmp_path / "junk.db")
