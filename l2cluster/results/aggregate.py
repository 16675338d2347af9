"""Aggregation over seeds: an experiment's stored jobs → one summary per configuration, ranked by validation accuracy.

Pure functions over plain data: `export_experiment` reads an experiment out of a Store into dicts (the
coordinator sends the same dicts to a remote CLI), and everything else works on those dicts, so the numbers
are the stored ones, never recomputed from logs. No Ray, no plotting here.

Statistics per configuration are over its succeeded jobs (one per seed): mean, sample standard deviation
(n − 1) and a 95% confidence interval of the mean from Student's t, mean ± t(0.975, n − 1)·sd/√n. The t
quantile is computed here (no scipy): the t CDF through the regularized incomplete beta function, inverted by
bisection.

Two experiments are compared per shared configuration by Welch's t-test on the seeds' final test accuracies
(unequal variances; degrees of freedom by Welch–Satterthwaite; two-sided p from the same t CDF).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from l2cluster.errors import InputError
from l2cluster.results.store import job_dict
from l2cluster.states import TERMINAL_STATES, JobState

CONFIDENCE = 0.95
# `--by` names that are not paths into the resolved config.
JOB_FIELDS = ("label", "seed", "job")


# -- Student t --------------------------------------------------------------------------------------------------
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method
    (Numerical Recipes, 3rd ed., §6.4, `betacf`)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 ≤ x ≤ 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got x={x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast for x < (a + 1)/(a + b + 2); use the symmetry I_x(a,b) = 1 − I_{1−x}(b,a)
    # on the other side.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with df degrees of freedom: 1 − ½·I_{df/(df+t²)}(df/2, ½) for t > 0."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom (t(0.975, 4) = 2.7764…), by bisection on t_cdf."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):  # the bracket halves each time: far below double precision long before 200
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation and the 95% CI of the mean of n values (sd and CI need n ≥ 2)."""

    n: int
    mean: float | None
    sd: float | None
    ci_low: float | None
    ci_high: float | None

    @property
    def half_width(self) -> float | None:
        # type-check: ci_high is only set together with mean
        return None if self.ci_high is None else self.ci_high - self.mean  # type: ignore[operator]


def summarize(values: Iterable[float | None], confidence: float = CONFIDENCE) -> Stat:
    """Stat of the finite values (None and non-finite ones are left out)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return Stat(0, None, None, None, None)
    mean = math.fsum(xs) / n
    if n == 1:
        return Stat(1, mean, None, None, None)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Stat(n, mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
class Welch:
    """Welch's two-sample t-test of mean(b) − mean(a): the difference, its standard error, t, the
    Welch–Satterthwaite degrees of freedom, the two-sided p and the 95% CI of the difference. t, df, p and the CI
    are None where a sample has fewer than 2 values or both have no spread (se = 0)."""

    delta: float
    se: float | None
    t: float | None
    df: float | None
    p: float | None
    ci_low: float | None
    ci_high: float | None


def welch(a: Iterable[float | None], b: Iterable[float | None], confidence: float = CONFIDENCE) -> Welch | None:
    """Welch's t-test of b against a (None and non-finite values left out); None if either sample is empty.

    t = (mean_b − mean_a) / se with se² = s_a²/n_a + s_b²/n_b, and
    df = se⁴ / ((s_a²/n_a)²/(n_a − 1) + (s_b²/n_b)²/(n_b − 1))  (Welch 1947; Satterthwaite 1946)."""
    sa, sb = summarize(a), summarize(b)
    if sa.n == 0 or sb.n == 0:
        return None
    # type-check: n >= 1 here (returned above): mean is set
    delta = sb.mean - sa.mean  # type: ignore[operator]
    if sa.n < 2 or sb.n < 2:
        return Welch(delta, None, None, None, None, None, None)
    # type-check: n >= 2 here (returned above): sd is set
    va, vb = sa.sd**2 / sa.n, sb.sd**2 / sb.n  # type: ignore[operator]
    se = math.sqrt(va + vb)
    if se == 0:
        return Welch(delta, 0.0, None, None, None, None, None)
    t = delta / se
    df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
    p = min(1.0, 2.0 * t_cdf(-abs(t), df))
    half = t_quantile(0.5 + confidence / 2.0, df) * se
    return Welch(delta, se, t, df, p, delta - half, delta + half)


# -- reading an experiment ---------------------------------------------------------------------------------------
def export_experiment(store, experiment_id: str, *, epochs: bool = True) -> dict:
    """Everything aggregation needs about one experiment, as plain (picklable, JSON-able) dicts: its jobs with
    resolved config, group key, stored result and (with `epochs`) per-epoch metrics. KeyError if unknown."""
    experiment_id = store.resolve_experiment(experiment_id)  # the id, or a unique prefix of it
    exp = store.experiment(experiment_id)
    jobs = []
    for row in store.jobs(experiment_id):
        job = job_dict(row)
        job.update(group_key=row["group_key"], config=json.loads(row["config_json"]), result=store.result(row["id"]))
        if epochs:
            job["epochs"] = store.epochs(row["id"])
        jobs.append(job)
    return {"experiment": exp["id"], "name": exp["name"], "submitted_at": exp["submitted_at"], "jobs": jobs}


# -- grouping ----------------------------------------------------------------------------------------------------
class FieldError(InputError, ValueError):
    """A `--by` field that no job has."""


def config_value(config: dict, path: str) -> Any:
    """A dotted path into a resolved config (`optimizer.lr`, `regularizers.l2.strength`, `regularizers.0.name`);
    list entries by index or by plugin name, as in sweep grids. None where the config has no such field."""
    node: Any = config
    for part in path.split("."):
        if isinstance(node, dict):
            if part not in node:
                return None
            node = node[part]
        elif isinstance(node, list):
            if part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                node = next((x for x in node if isinstance(x, dict) and x.get("name") == part), None)
                if node is None:
                    return None
        else:
            return None
    return node


def _value_of(job: dict, field_name: str) -> Any:
    if field_name == "job":
        return job["job"]
    if field_name in ("label", "seed"):
        return job[field_name]
    return config_value(job["config"], field_name)


def format_value(v: Any) -> str:
    """Numbers as a person would write them in a spec: 0.0001 → 1e-4, 0.5 → 0.5."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            mantissa, exponent = f"{v:.2e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def settings_text(overrides: dict) -> str:
    """`strength=1e-4 lr=0.003`: each grid setting by its last path part, or `-` for none."""
    return " ".join(f"{k.split('.')[-1]}={format_value(v)}" for k, v in overrides.items()) or "-"


@dataclass
class Axis:
    """Where a configuration sits on a "metric vs strength" plot: its series (one regularizer's sweep) and x.

    `x` is None for a reference configuration (no regularizer, or a strength of 0), drawn as a horizontal
    line across the plots."""

    series: str
    knob: str | None
    x: float | None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def strength_axis(label: str, overrides: dict, config: dict) -> Axis:
    """Derive a configuration's regularizer and strength generically: the swept numeric setting of a regularizer
    (`regularizers.l2.strength`, `regularizers.dropout.p`, …) is the strength; its regularizer names the series.
    Without one, the one swept numeric setting (e.g. `optimizer.lr`) is x. A configuration with neither (no
    regularizer, or nothing swept), or a strength of 0, is a reference. Other swept settings become part of the
    series name."""
    regs = [r.get("name") for r in config.get("regularizers") or [] if isinstance(r, dict)]
    numeric = {k: v for k, v in overrides.items() if _is_number(v)}
    reg_paths = [k for k in numeric if k.startswith("regularizers.")]
    x_path = reg_paths[0] if len(reg_paths) == 1 else (next(iter(numeric)) if len(numeric) == 1 else None)
    rest = settings_text({k: v for k, v in overrides.items() if k != x_path})
    if x_path is None or (not regs and x_path.startswith("regularizers.")):
        # type-check: the regularizer names of a spec: never None
        name = label or ("none" if not regs else "+".join(regs))  # type: ignore[arg-type]
        return Axis(name if rest == "-" else f"{name} {rest}", None, None)
    parts = x_path.split(".")
    if parts[0] == "regularizers" and len(parts) >= 3:
        reg = parts[1]
        if reg.isdigit() and int(reg) < len(regs):
            reg = regs[int(reg)]
        knob = f"{reg} {parts[-1]}"
        name = reg if not label or label == reg else f"{label} ({reg})"
    else:
        knob = x_path
        # type-check: the regularizer names of a spec: never None
        name = label or ("+".join(regs) if regs else "none")  # type: ignore[arg-type]
    if rest != "-":
        name = f"{name} {rest}"
    x = float(numeric[x_path])
    if parts[0] == "regularizers" and x == 0:  # a strength of 0 is the unregularized baseline
        return Axis(f"{name} {parts[-1]}=0", knob, None)
    return Axis(name, knob, x)


@dataclass
class Group:
    """One configuration (or one value of the `--by` fields) of one experiment, summarized over its seeds."""

    experiment: str
    key: str
    label: str
    overrides: dict
    settings: str
    axis: Axis
    seeds: list[int]
    num_jobs: int
    num_succeeded: int
    num_diverged: int
    num_failed: int
    num_cancelled: int
    num_pending: int
    val_acc: Stat
    val_loss: Stat
    best_val_acc: Stat
    best_epoch: float | None
    test_acc: Stat
    test_loss: Stat
    train_acc: Stat
    gap: Stat
    weight_norm: Stat
    curves: list[dict] = field(default_factory=list)
    per_seed: list[dict] = field(default_factory=list)
    regularizers: str = "none"
    rank: int = 0

    @property
    def name(self) -> str:
        """The configuration as a person reads it: `l2 strength=1e-4`, `none`."""
        if self.label and self.settings != "-":
            return f"{self.label} {self.settings}"
        return self.label or (self.settings if self.settings != "-" else self.axis.series)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["name"] = self.name
        return d


def _best_of(epochs: list[dict], final: dict) -> tuple[float | None, int | None]:
    """Best validation accuracy and its (first) epoch, from the per-epoch rows; the result's own record if there
    are none."""
    rows = [e for e in epochs if _is_number(e.get("val_acc"))]
    if not rows:
        return final.get("best_val_acc"), final.get("best_epoch")
    best = max(rows, key=lambda e: (e["val_acc"], -e["epoch"]))
    return best["val_acc"], best["epoch"]


CURVE_METRICS = ("train_loss", "val_loss", "train_acc", "val_acc")
DYNAMICS_METRICS = ("lr", "grad_norm", "clipped_steps")


def _curves(jobs: list[dict]) -> list[dict]:
    """Per epoch over the jobs: how many reached it, and for each stored metric the mean, the sample sd and the
    min and max over seeds (`val_acc`, `val_acc_sd`, `val_acc_min`, `val_acc_max`); None where no job has it."""
    by_epoch: dict[int, list[dict]] = {}
    for job in jobs:
        for e in job.get("epochs") or []:
            by_epoch.setdefault(e["epoch"], []).append(e)
    out = []
    for epoch in sorted(by_epoch):
        rows = by_epoch[epoch]
        point: dict[str, Any] = {"epoch": epoch, "n": len(rows)}
        for key in (*CURVE_METRICS, *DYNAMICS_METRICS):
            values = [float(r[key]) for r in rows if _is_number(r.get(key))]
            point[key] = summarize(values).mean
            point[f"{key}_sd"] = summarize(values).sd
            point[f"{key}_min"] = min(values) if values else None
            point[f"{key}_max"] = max(values) if values else None
        out.append(point)
    return out


def _per_seed(job: dict) -> dict:
    """One succeeded job's final numbers, for per-seed points and tests between experiments."""
    f = job["result"]["final"]
    gap = f["train_acc"] - f["test_acc"] if _is_number(f.get("train_acc")) and _is_number(f.get("test_acc")) else None
    return {"seed": job["seed"], "val_acc": f.get("val_acc"), "test_acc": f.get("test_acc"),
            "test_loss": f.get("test_loss"), "gap": gap, "weight_norm": f.get("weight_norm")}


def group_jobs(export: dict, by: Sequence[str] | None = None) -> list[Group]:
    """Summarize an experiment's jobs per configuration (the stored group key: everything but the seed), or per
    value of the `by` fields (`label`, `seed`, `job`, or dotted config paths such as `optimizer.lr`); ranked."""
    jobs = export["jobs"]
    by = list(by or [])
    for f in by:
        if f not in JOB_FIELDS and jobs and all(config_value(j["config"], f) is None for j in jobs):
            fields = ", ".join(dict.fromkeys([*JOB_FIELDS, *sorted(jobs[0]["config"])]))
            raise FieldError(f"--by {f}: no job of {export['experiment']} has this field; use one of {fields}, "
                             "or a dotted path into them (optimizer.lr, regularizers.l2.strength)")
    buckets: dict[str, list[dict]] = {}
    for job in jobs:
        key = job["group_key"] if not by else json.dumps([_value_of(job, f) for f in by], sort_keys=True)
        buckets.setdefault(key, []).append(job)
    groups = [_summarize_group(export["experiment"], key, members, by) for key, members in buckets.items()]
    return rank(groups)


def _summarize_group(experiment: str, key: str, jobs: list[dict], by: list[str]) -> Group:
    first = jobs[0]
    if by:
        label = str(_value_of(first, "label")) if "label" in by else ""
        overrides = {f: _value_of(first, f) for f in by if f != "label"}
        axis = Axis(label or settings_text(overrides), None, None)
    else:
        label, overrides = first["label"], first["overrides"]
        axis = strength_axis(label, overrides, first["config"])
    states = [j["state"] for j in jobs]
    ok = [j for j in jobs if j["state"] == JobState.SUCCEEDED and j.get("result")]
    finals = [j["result"]["final"] for j in ok]
    bests = [_best_of(j.get("epochs") or [], j["result"]["final"]) for j in ok]
    best_epochs = [e for _, e in bests if e is not None]
    return Group(
        experiment=experiment, key=key, label=label, overrides=overrides, settings=settings_text(overrides),
        axis=axis, seeds=sorted(j["seed"] for j in ok), num_jobs=len(jobs), num_succeeded=len(ok),
        num_diverged=states.count(JobState.DIVERGED), num_failed=states.count(JobState.FAILED),
        num_cancelled=states.count(JobState.CANCELLED), num_pending=sum(s not in TERMINAL_STATES for s in states),
        val_acc=summarize(f.get("val_acc") for f in finals), val_loss=summarize(f.get("val_loss") for f in finals),
        best_val_acc=summarize(v for v, _ in bests),
        best_epoch=statistics.median(best_epochs) if best_epochs else None,
        test_acc=summarize(f.get("test_acc") for f in finals), test_loss=summarize(f.get("test_loss") for f in finals),
        train_acc=summarize(f.get("train_acc") for f in finals),
        gap=summarize(f["train_acc"] - f["test_acc"] for f in finals
                      if _is_number(f.get("train_acc")) and _is_number(f.get("test_acc"))),
        weight_norm=summarize(f.get("weight_norm") for f in finals),
        curves=_curves(ok),
        per_seed=sorted((_per_seed(j) for j in ok), key=lambda r: r["seed"]),
        regularizers="+".join(r.get("name", "?") for r in first["config"].get("regularizers") or []
                              if isinstance(r, dict)) or "none",
    )


def rank(groups: list[Group]) -> list[Group]:
    """Order by mean final validation accuracy, best first — never by test accuracy (ties: mean best validation
    accuracy, then name). A configuration with a diverged or failed seed ranks below every one without; one with no
    finished seed comes last."""
    def key(g: Group):
        return (g.num_succeeded == 0, g.num_diverged + g.num_failed > 0, -(g.val_acc.mean or 0.0),
                -(g.best_val_acc.mean or 0.0), g.name)

    groups = sorted(groups, key=key)
    for i, g in enumerate(groups, 1):
        g.rank = i
    return groups


def best(groups: Sequence[Group]) -> Group | None:
    """The top-ranked configuration with at least one finished seed."""
    return next((g for g in groups if g.num_succeeded), None)


# -- several experiments ------------------------------------------------------------------------------------------
def compare(per_experiment: Sequence[Sequence[Group]]) -> list[dict]:
    """Side by side: one row per configuration (matched by variant and grid settings across experiments), with
    each experiment's group (or None). Rows follow the first experiment's ranking, then the next's."""
    rows: dict[str, dict] = {}
    for i, groups in enumerate(per_experiment):
        for g in groups:
            match = json.dumps([g.label, g.overrides], sort_keys=True)
            row = rows.setdefault(match, {"name": g.name, "label": g.label, "settings": g.settings,
                                          "groups": [None] * len(per_experiment), "order": (i, g.rank)})
            row["groups"][i] = g
    return sorted(rows.values(), key=lambda r: r["order"])


def compare_tests(per_experiment: Sequence[Sequence[Group]], metric: str = "test_acc") -> list[dict]:
    """`compare`'s rows, each with `tests`: for every later experiment i ≥ 1, Welch's test of its per-seed `metric`
    against the first experiment's (B − A), or None where the configuration is missing from either."""
    rows = compare(per_experiment)
    for row in rows:
        first = row["groups"][0]
        row["tests"] = [None if first is None or g is None else
                        welch([s[metric] for s in first.per_seed], [s[metric] for s in g.per_seed])
                        for g in row["groups"][1:]]
    return rows
