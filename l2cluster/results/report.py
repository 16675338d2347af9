"""Presenting aggregated results: the results table in four formats, the plots, and the self-contained HTML report.

Everything here reads `l2cluster.results.aggregate.Group`s; nothing is recomputed. Plots are drawn with matplotlib's
object API on the Agg canvas (no display, no pyplot global state), imported only when a report is written.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path

from l2cluster.results.aggregate import (
    DYNAMICS_METRICS,
    Group,
    Stat,
    Welch,
    best,
    compare_tests,
    format_value,
    group_jobs,
)

FORMATS = ("table", "csv", "json", "markdown")
_METRICS = ("val_acc", "val_loss", "best_val_acc", "test_acc", "test_loss", "train_acc", "gap", "weight_norm")


# -- text formats --------------------------------------------------------------------------------------------------
def _pct(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}"


def _num(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _with_ci(s: Stat, fmt) -> str:
    """`97.85 ± 0.24`: the mean and the 95% CI half-width (just the mean for one seed)."""
    if s.mean is None:
        return "-"
    return fmt(s.mean) if s.half_width is None else f"{fmt(s.mean)} ± {fmt(s.half_width)}"


def _n(g: Group) -> str:
    return str(g.num_succeeded) if g.num_succeeded == g.num_jobs else f"{g.num_succeeded}/{g.num_jobs}"


def summary_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    """The human table: header and rows, ranked; accuracies in %, the gap in percentage points."""
    extra = [name for name, attr in (("failed", "num_failed"), ("cancelled", "num_cancelled"),
                                     ("pending", "num_pending")) if any(getattr(g, attr) for g in groups)]
    header = ["rank", "configuration", "n", "val acc %", "test acc % ± 95% CI", "test acc sd", "test loss ± 95% CI",
              "best val acc % (epoch)", "gap pp ± 95% CI", "weight norm", "diverged", *extra]
    rows = []
    for g in groups:
        best_epoch = "" if g.best_epoch is None else f" ({format_value(float(g.best_epoch))})"
        rows.append([
            str(g.rank), g.name, _n(g), _pct(g.val_acc.mean), _with_ci(g.test_acc, _pct), _pct(g.test_acc.sd),
            _with_ci(g.test_loss, _num), _pct(g.best_val_acc.mean) + (best_epoch if g.best_val_acc.mean else ""),
            _with_ci(g.gap, _pct), _num(g.weight_norm.mean, 2), str(g.num_diverged),
            *[str(getattr(g, f"num_{name}")) for name in extra],
        ])
    return header, rows


def _p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def _delta_cells(test: Welch | None, present: Sequence[bool], i: int) -> list[str]:
    """Δ test acc (pp), t, df, p of experiment [i] against [1]; 'only in [k]' where a side is missing."""
    if test is None:
        where = ",".join(f"[{k}]" for k in (1, i) if present[k - 1])
        return [f"only in {where}" if where else "-", "-", "-", "-"]
    return [f"{100 * test.delta:+.2f}", "-" if test.t is None else f"{test.t:.2f}",
            "-" if test.df is None else f"{test.df:.1f}", _p(test.p)]


def comparison_rows(per_experiment: Sequence[Sequence[Group]]) -> tuple[list[str], list[list[str]]]:
    """Several experiments side by side, matched by configuration; `[i]` marks the i-th experiment. For each later
    experiment, the difference of mean test accuracy against the first ([i] − [1], percentage points) with Welch's
    t, df and two-sided p over the seeds."""
    header = ["configuration"]
    for i in range(1, len(per_experiment) + 1):
        header += [f"n [{i}]", f"val acc % [{i}]", f"test acc % ± 95% CI [{i}]"]
    for i in range(2, len(per_experiment) + 1):
        header += [f"Δ test pp [{i}]−[1]", "t", "df", "p"]
    rows = []
    for row in compare_tests(per_experiment):
        cells = [row["name"]]
        for g in row["groups"]:
            cells += ["-", "-", "-"] if g is None else [_n(g), _pct(g.val_acc.mean), _with_ci(g.test_acc, _pct)]
        present = [g is not None for g in row["groups"]]
        for i, test in enumerate(row["tests"], 2):
            cells += _delta_cells(test, present, i)
        rows.append(cells)
    return header, rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "| " + " | ".join("---" for _ in header) + " |", *map(line, rows)])


def flat_record(g: Group) -> dict:
    """One group as flat columns (fractions, not %), for CSV."""
    rec = {"rank": g.rank, "experiment": g.experiment, "configuration": g.name, "label": g.label,
           "settings": g.settings, "group_key": g.key, "regularizer_setting": g.axis.knob or "",
           "strength": "" if g.axis.x is None else g.axis.x, "n": g.num_succeeded, "num_jobs": g.num_jobs,
           "num_diverged": g.num_diverged, "num_failed": g.num_failed, "num_cancelled": g.num_cancelled,
           "num_pending": g.num_pending, "seeds": " ".join(map(str, g.seeds))}
    for m in _METRICS:
        s: Stat = getattr(g, m)
        rec.update({f"{m}_mean": s.mean, f"{m}_sd": s.sd, f"{m}_ci95_low": s.ci_low, f"{m}_ci95_high": s.ci_high})
    rec["best_epoch_median"] = g.best_epoch
    return {k: "" if v is None else v for k, v in rec.items()}


def render(per_experiment: Sequence[Sequence[Group]], fmt: str, experiments: Sequence[str]) -> str:
    """The `results` output for one or several experiments in one of FORMATS."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if fmt == "json":
        out = [g.to_dict() for groups in per_experiment for g in groups]
        return json.dumps(out, indent=2, default=float)
    if fmt == "csv":
        records = [flat_record(g) for groups in per_experiment for g in groups]
        buf = io.StringIO()
        if records:
            writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)
        return buf.getvalue().rstrip("\n")
    table = text_table if fmt == "table" else markdown_table
    if len(per_experiment) == 1:
        return table(*summary_rows(per_experiment[0]))
    legend = "  ".join(f"[{i}] {e}" for i, e in enumerate(experiments, 1))
    return legend + ("\n\n" if fmt == "markdown" else "\n") + table(*comparison_rows(per_experiment))


# -- what to draw (pure: no matplotlib) ---------------------------------------------------------------------------
def axis_scale(xs: Sequence[float]) -> str:
    """"log" for a setting whose positive values span at least two decades (max/min ≥ 100, e.g. an L2 strength
    1e-4…1e-2); "linear" otherwise, which keeps probabilities (dropout p, label smoothing ε in [0, 1]) and narrow
    ranges on a readable linear axis."""
    xs = [x for x in xs if x is not None]
    if xs and all(x > 0 for x in xs) and max(xs) / min(xs) >= 100:
        return "log"
    return "linear"


def grids_2d(groups: Sequence[Group]) -> list[tuple[str, str, str, list[Group]]]:
    """The two-dimensional grids: per variant label, the configurations whose numeric settings vary along exactly
    two swept paths, each with at least two values. Returns (label, x path, y path, groups) per grid."""
    by_label: dict[str, list[Group]] = {}
    for g in groups:
        if g.num_succeeded:
            by_label.setdefault(g.label, []).append(g)
    grids = []
    for label, members in by_label.items():
        paths = dict.fromkeys(k for g in members for k in g.overrides)
        swept = [k for k in paths if len({json.dumps(g.overrides.get(k)) for g in members}) >= 2]
        numeric = [k for k in swept if all(isinstance(g.overrides.get(k), (int, float))
                                           and not isinstance(g.overrides.get(k), bool) for g in members)]
        if len(swept) == 2 and numeric == swept:
            grids.append((label, swept[0], swept[1], members))
    return grids


def baseline(groups: Sequence[Group]) -> Group | None:
    """The reference configuration: the variant labelled "none" if there is one, else the best-ranked configuration
    without regularizers; None if neither has a finished seed."""
    done = [g for g in groups if g.num_succeeded]
    return next((g for g in done if g.label == "none"), None) or next(
        (g for g in done if g.regularizers == "none"), None)


def varying_dynamics(groups: Sequence[Group]) -> list[str]:
    """Which of the per-epoch `lr`, `grad_norm`, `clipped_steps` change across epochs or configurations (a
    constant learning rate or never-clipped steps say nothing worth a plot)."""
    out = []
    for key in DYNAMICS_METRICS:
        values = [c[key] for g in groups for c in g.curves if c.get(key) is not None]
        if values and max(values) - min(values) > 1e-12 * max(1.0, max(abs(v) for v in values)):
            out.append(key)
    return out


# -- plots ---------------------------------------------------------------------------------------------------------
def _figure(num_panels: int, *, width: float = 5.2, height: float = 3.8):
    from matplotlib.figure import Figure

    cols = min(num_panels, 2)
    rows = -(-num_panels // cols)
    fig = Figure(figsize=(width * cols, height * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    flat = list(axes.flat)
    for ax in flat[num_panels:]:
        ax.set_visible(False)
    return fig, flat[:num_panels]


def _panels(groups: Sequence[Group]) -> tuple[dict[str, list[Group]], list[Group]]:
    """Series with a strength (one panel each, ordered by their best rank) and the reference configurations."""
    series: dict[str, list[Group]] = {}
    refs = []
    for g in sorted(groups, key=lambda g: g.rank):
        if g.num_succeeded == 0:
            continue
        if g.axis.x is None:
            refs.append(g)
        else:
            series.setdefault(g.axis.series, []).append(g)
    # type-check: the series hold only the groups with an x (the others are refs)
    return {k: sorted(v, key=lambda g: g.axis.x) for k, v in series.items()}, refs  # type: ignore[arg-type, return-value]


_REF_COLORS = ("0.55", "tab:brown", "tab:olive", "tab:cyan")
_BEST_COLOR = "crimson"


def _ref_name(g: Group) -> str:
    return ("no regularizer" if g.axis.series == "none" else g.axis.series) + " (baseline)"


def _metric_vs_strength(groups: Sequence[Group], metric: str, ylabel: str, title: str, scale: float, path: Path,
                        experiment: str) -> Path:
    from matplotlib.ticker import NullLocator

    series, refs = _panels(groups)
    top = best(groups)
    fig, axes = _figure(max(1, len(series)))
    if not series:  # nothing swept: the configurations side by side
        title = title.split(" vs ")[0] + " per configuration"
        ax = axes[0]
        shown = refs
        for i, g in enumerate(shown):
            s = getattr(g, metric)
            ax.errorbar([i], [s.mean * scale], yerr=[(s.half_width or 0) * scale], fmt="o", capsize=4,
                        color=_BEST_COLOR if g is top else "tab:blue", markersize=10 if g is top else 6)
        ax.set_xticks(range(len(shown)), [g.name for g in shown], rotation=20, ha="right")
        ax.set_xlabel("configuration")
        ax.set_ylabel(ylabel)
    for ax, (name, members) in zip(axes, series.items()):
        xs = [g.axis.x for g in members]
        stats = [getattr(g, metric) for g in members]
        ax.errorbar(xs, [s.mean * scale for s in stats], yerr=[(s.half_width or 0) * scale for s in stats],
                    fmt="o-", capsize=4, color="tab:blue", label=f"{name} (mean ± 95% CI)")
        seed_x = [g.axis.x for g in members for r in g.per_seed if r.get(metric) is not None]
        seed_y = [r[metric] * scale for g in members for r in g.per_seed if r.get(metric) is not None]
        ax.plot(seed_x, seed_y, "o", color="tab:blue", alpha=0.35, markersize=4, markerfacecolor="none",
                label="one seed")
        for g, s in zip(members, stats):
            if g is top:
                ax.plot([g.axis.x], [s.mean * scale], marker="*", markersize=18, color=_BEST_COLOR, linestyle="none",
                        # type-check: a group on the x axis names its knob
                        label=f"best by val acc: {g.axis.knob.split()[-1]}={format_value(g.axis.x)}", zorder=5)  # type: ignore[union-attr]
        for i, ref in enumerate(refs):
            s = getattr(ref, metric)
            color = _BEST_COLOR if ref is top else _REF_COLORS[i % len(_REF_COLORS)]
            ax.axhline(s.mean * scale, color=color, linestyle="--", linewidth=2.5 if ref is top else 1.2,
                       label=f"{_ref_name(ref)}{' — best by val acc' if ref is top else ''}")
            if s.half_width:
                ax.axhspan((s.mean - s.half_width) * scale, (s.mean + s.half_width) * scale, color=color, alpha=0.12)
        # type-check: the x of every plotted group: a number
        scale_name = axis_scale(xs)  # type: ignore[arg-type]
        ax.set_xscale(scale_name)
        # Ticks at the swept values, written as in the spec (1e-4, 0.5), instead of 2×10⁻¹.
        ax.set_xticks(xs, [format_value(x) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(f"{members[0].axis.knob}" + (" (log scale)" if scale_name == "log" else ""))
        ax.set_title(name + ("  ★ best" if top in members else ""), color=_BEST_COLOR if top in members else "black",
                     fontweight="bold" if top in members else "normal")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in axes:
        ax.set_ylabel(ylabel)
        ax.yaxis.set_tick_params(labelleft=True)
    n = sorted({g.num_succeeded for g in groups if g.num_succeeded})
    fig.suptitle(f"{title} — {experiment}\nmean over seeds (n = {'/'.join(map(str, n))}), "
                 "error bars: 95% CI (Student t), open circles: single seeds", fontsize=11)
    fig.savefig(path, dpi=110)
    return path


_CURVES = {
    "accuracy": ("val_acc", "train_acc", "accuracy (%)", 100.0, "lower right"),
    "loss": ("val_loss", "train_loss", "cross-entropy loss (nats)", 1.0, "upper right"),
}


def _epoch_curves(groups: Sequence[Group], kind: str, path: Path, experiment: str) -> Path:
    """Validation (solid, with the min–max band over seeds) and training (dashed) accuracy or loss per epoch, one
    panel per regularizer sweep, the baselines in each."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    val_key, train_key, ylabel, scale, legend_loc = _CURVES[kind]
    series, refs = _panels(groups)
    top = best(groups)
    panels = list(series.items()) or [("all configurations", refs)]
    fig, axes = _figure(len(panels))
    cmap = colormaps["viridis"]
    for ax, (name, members) in zip(axes, panels):
        handles = []
        lines = [(g, cmap(0.85 * i / max(1, len(members) - 1)), False) for i, g in enumerate(members)]
        if series:
            # type-check: matplotlib takes a colour as a name or an RGBA tuple
            lines += [(r, _REF_COLORS[i % len(_REF_COLORS)], True) for i, r in enumerate(refs)]  # type: ignore[misc]
        for g, color, is_ref in lines:
            # type-check: matplotlib takes a colour as a name or an RGBA tuple
            color = _BEST_COLOR if g is top else color  # type: ignore[assignment]
            width = 2.8 if g is top else 1.4
            points = [c for c in g.curves if c.get(val_key) is not None]
            epochs = [c["epoch"] for c in points]
            ax.plot(epochs, [c[val_key] * scale for c in points], "-o", color=color, linewidth=width, markersize=3)
            ax.fill_between(epochs, [c[f"{val_key}_min"] * scale for c in points],
                            [c[f"{val_key}_max"] * scale for c in points], color=color, alpha=0.15, linewidth=0)
            train = [c for c in g.curves if c.get(train_key) is not None]
            ax.plot([c["epoch"] for c in train], [c[train_key] * scale for c in train], "--", color=color,
                    linewidth=width)
            if g.axis.x is not None:
                # type-check: a group on the x axis names its knob
                label = f"{g.axis.knob.split()[-1]}={format_value(g.axis.x)}"  # type: ignore[union-attr]
            else:
                label = _ref_name(g) if is_ref else g.axis.series
            handles.append(Line2D([], [], color=color, linewidth=width, label=label + (" ★ best" if g is top else "")))
        handles += [Line2D([], [], color="black", linestyle="-", marker="o", markersize=3, label="validation (mean)"),
                    # type-check: a legend takes any artist as a handle
                    Patch(color="black", alpha=0.15, label="validation, min–max over seeds"),  # type: ignore[list-item]
                    Line2D([], [], color="black", linestyle="--", label="train (during the epoch)")]
        ax.legend(handles=handles, fontsize=8, loc=legend_loc)
        ax.set_title(name + ("  ★ best" if top in members else ""), color=_BEST_COLOR if top in members else "black",
                     fontweight="bold" if top in members else "normal")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.yaxis.set_tick_params(labelleft=True)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Validation and training {kind} per epoch — {experiment}\nmean over seeds per configuration, "
                 "band: min–max over seeds", fontsize=11)
    fig.savefig(path, dpi=110)
    return path


def _regularizer_colors(groups: Sequence[Group]) -> dict[str, str]:
    names = sorted({g.regularizers for g in groups if g.regularizers != "none"})
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    colors["none"] = "0.35"
    return colors


def _forest(groups: Sequence[Group], path: Path, experiment: str) -> Path:
    """Every configuration's test accuracy (mean ± 95% CI, single seeds as open circles), sorted, coloured by
    regularizer, with the baseline's CI as a vertical band."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    done = sorted((g for g in groups if g.num_succeeded and g.test_acc.mean is not None),
                  # type-check: the filter above keeps only groups whose test_acc.mean is set
                  key=lambda g: g.test_acc.mean)  # type: ignore[arg-type, return-value]
    colors = _regularizer_colors(done)
    ref, top = baseline(done), best(groups)
    fig = Figure(figsize=(9.5, 2.0 + 0.3 * max(1, len(done))), layout="constrained")
    ax = fig.subplots()
    if ref is not None and ref.test_acc.half_width:
        # type-check: a reference with a succeeded job: its test_acc interval is set
        ax.axvspan(ref.test_acc.ci_low * 100, ref.test_acc.ci_high * 100, color="0.85", zorder=0)  # type: ignore[operator]
    if ref is not None:
        # type-check: a reference with a succeeded job: its test_acc mean is set
        ax.axvline(ref.test_acc.mean * 100, color="0.35", linestyle="--", linewidth=1, zorder=1)  # type: ignore[operator]
    for y, g in enumerate(done):
        color = colors[g.regularizers]
        s = g.test_acc
        # type-check: only groups with a succeeded job are plotted: test_acc.mean is set
        ax.errorbar([s.mean * 100], [y], xerr=[(s.half_width or 0) * 100], fmt="s" if g is top else "o",  # type: ignore[operator]
                    color=color, capsize=3, markersize=8 if g is top else 5, zorder=3)
        seeds = [r["test_acc"] * 100 for r in g.per_seed if r.get("test_acc") is not None]
        ax.plot(seeds, [y] * len(seeds), "o", color=color, alpha=0.4, markersize=3.5, markerfacecolor="none", zorder=2)
    ax.set_yticks(range(len(done)), [g.name + (" ★" if g is top else "") for g in done], fontsize=8)
    for tick, g in zip(ax.get_yticklabels(), done):
        if g is top:
            tick.set_color(_BEST_COLOR)
            tick.set_fontweight("bold")
    ax.set_xlabel("test accuracy (%)")
    ax.grid(True, axis="x", alpha=0.3)
    handles = [Line2D([], [], color=c, marker="o", linestyle="none", label=name) for name, c in colors.items()
               if any(g.regularizers == name for g in done)]
    if ref is not None:
        handles.append(Line2D([], [], color="0.35", linestyle="--", linewidth=6, alpha=0.35,
                              label=f"baseline {ref.name} (mean, 95% CI band)"))
    handles.append(Line2D([], [], color="0.3", marker="o", markerfacecolor="none", linestyle="none", alpha=0.5,
                          label="one seed"))
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=min(4, len(handles)))
    fig.suptitle(f"Test accuracy of every configuration — {experiment}\nmean ± 95% CI (Student t) over seeds, "
                 "sorted; ★ best by validation accuracy", fontsize=11)
    fig.savefig(path, dpi=110)
    return path


def _heatmap(grid: tuple[str, str, str, list[Group]], path: Path, experiment: str) -> Path:
    """Mean test accuracy over a two-dimensional grid, each cell annotated with mean ± CI half-width."""
    from matplotlib.figure import Figure

    label, x_path, y_path, members = grid
    xs = sorted({g.overrides[x_path] for g in members})
    ys = sorted({g.overrides[y_path] for g in members})
    values: list[list[float | None]] = [[None] * len(xs) for _ in ys]
    cells = {}
    for g in members:
        i, j = ys.index(g.overrides[y_path]), xs.index(g.overrides[x_path])
        values[i][j] = None if g.test_acc.mean is None else g.test_acc.mean * 100
        cells[i, j] = g
    fig = Figure(figsize=(min(9.5, 2.2 + 1.3 * len(xs)), 1.8 + 0.7 * len(ys)), layout="constrained")
    ax = fig.subplots()
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    image = ax.imshow(data, cmap="viridis", aspect="auto", origin="lower")
    fig.colorbar(image, ax=ax, label="test accuracy (%)")
    finite = data[np.isfinite(data)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for (i, j), g in cells.items():
        if g.test_acc.mean is None:
            continue
        half = g.test_acc.half_width
        text = f"{g.test_acc.mean * 100:.2f}" + (f"\n± {half * 100:.2f}" if half else "")
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if data[i, j] > mid else "white")
    ax.set_xticks(range(len(xs)), [format_value(x) for x in xs])
    ax.set_yticks(range(len(ys)), [format_value(y) for y in ys])
    ax.set_xlabel(x_path)
    ax.set_ylabel(y_path)
    fig.suptitle(f"Test accuracy over the {label or 'grid'} grid — {experiment}\nmean ± 95% CI half-width over seeds",
                 fontsize=11)
    fig.savefig(path, dpi=110)
    return path


_DYNAMICS_LABELS = {"lr": "learning rate", "grad_norm": "mean gradient norm per step",
                    "clipped_steps": "clipped steps per epoch"}


def _dynamics(groups: Sequence[Group], keys: Sequence[str], path: Path, experiment: str) -> Path:
    """The per-epoch training dynamics that vary (`varying_dynamics`), one panel each, a line per configuration."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    done = [g for g in groups if g.num_succeeded]
    cmap = colormaps["tab20"]
    fig = Figure(figsize=(9.5, 0.8 + 2.8 * len(keys) + 0.22 * -(-len(done) // 3)), layout="constrained")
    axes = fig.subplots(len(keys), 1, squeeze=False, sharex=True)[:, 0]
    for ax, key in zip(axes, keys):
        for i, g in enumerate(done):
            points = [c for c in g.curves if c.get(key) is not None]
            ax.plot([c["epoch"] for c in points], [c[key] for c in points], "-o", markersize=3, linewidth=1.3,
                    color=cmap(i % 20), label=g.name if ax is axes[0] else None)
        ax.set_ylabel(_DYNAMICS_LABELS[key], fontsize=9)
        if key == "lr" and axis_scale([c["lr"] for g in done for c in g.curves if c.get("lr")]) == "log":
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("epoch")
    fig.legend(loc="outside lower center", ncol=3, fontsize=7)
    fig.suptitle(f"Training dynamics per epoch — {experiment}\nmean over seeds per configuration "
                 "(only the quantities that vary)", fontsize=11)
    fig.savefig(path, dpi=110)
    return path


def _deltas_plot(per_experiment: Sequence[Sequence[Group]], experiments: Sequence[str], path: Path) -> Path:
    """Δ mean test accuracy of each later experiment against the first, per shared configuration, with the Welch
    95% CI of the difference."""
    from matplotlib.figure import Figure

    rows = [(row["name"], i, t) for row in compare_tests(per_experiment) for i, t in enumerate(row["tests"], 2)
            if t is not None]
    fig = Figure(figsize=(9.5, 1.6 + 0.3 * max(1, len(rows))), layout="constrained")
    ax = fig.subplots()
    ax.axvline(0, color="0.3", linewidth=1)
    for y, (_, _, t) in enumerate(rows):
        err = None if t.ci_low is None else [[100 * (t.delta - t.ci_low)], [100 * (t.ci_high - t.delta)]]
        ax.errorbar([100 * t.delta], [y], xerr=err, fmt="o", capsize=3,
                    color="tab:green" if t.delta >= 0 else "tab:red")
    labels = [f"{name} [{i}]−[1]" + ("" if t.p is None else f"  p={_p(t.p)}") for name, i, t in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel("Δ mean test accuracy (percentage points)")
    ax.grid(True, axis="x", alpha=0.3)
    legend = "   ".join(f"[{i}] {e}" for i, e in enumerate(experiments, 1))
    fig.suptitle(f"Difference of test accuracy per shared configuration\n{legend}; error bars: Welch 95% CI",
                 fontsize=11)
    fig.savefig(path, dpi=110)
    return path


PLOTS = (
    ("test_acc_vs_strength.png", "Test accuracy vs regularization strength", "test_acc", "test accuracy (%)", 100.0),
    ("gap_vs_strength.png", "Generalization gap (train acc − test acc) vs strength", "gap",
     "train acc − test acc (percentage points)", 100.0),
    ("weight_norm_vs_strength.png", "Final weight norm vs strength", "weight_norm",
     "‖θ‖₂ over all parameters (after the last epoch)", 1.0),
)


# -- the HTML report -----------------------------------------------------------------------------------------------
# Sized for a 1000 px window: the configuration column and the headers wrap, numbers do not.
_CSS = """
* { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; margin: 1.5em auto; padding: 0 12px; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 12.5px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; white-space: normal; vertical-align: bottom; }
td.name { text-align: left; white-space: normal; overflow-wrap: anywhere; min-width: 9em; max-width: 18em; }
tr.best td { background: #fde2e4; font-weight: bold; }
.callout { background: #fde2e4; border-left: 4px solid crimson; padding: 0.6em 1em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.5em 0 1.5em; }
.note { color: #555; font-size: 13px; }
"""


def html_summary_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    """The ranked table for the page: `summary_rows` without the sd column and with shorter headers, so it fits a
    1000 px window (the sd is in results.csv)."""
    header, rows = summary_rows(groups)
    keep = [i for i, h in enumerate(header) if h != "test acc sd"]
    short = {"test acc % ± 95% CI": "test acc % ± CI", "test loss ± 95% CI": "test loss ± CI",
             "best val acc % (epoch)": "best val % (epoch)", "gap pp ± 95% CI": "gap pp ± CI",
             "weight norm": "‖θ‖₂", "diverged": "div."}
    return [short.get(header[i], header[i]) for i in keep], [[r[i] for i in keep] for r in rows]


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], best_row: int | None, name_column: int,
                table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        ('<tr class="best">' if i == best_row else "<tr>")
        + "".join(f'<td class="name">{html.escape(c)}</td>' if k == name_column else f"<td>{html.escape(c)}</td>"
                  for k, c in enumerate(r)) + "</tr>"
        for i, r in enumerate(rows))
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _embed(path: Path, caption: str, section_id: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<section id="{section_id}"><h3>{html.escape(caption)}</h3>\n'
            f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}"></section>')


def _experiment_plots(groups: Sequence[Group], out: Path, experiment: str, prefix: str) -> list[tuple[Path, str, str]]:
    """Draw one experiment's figures; (path, caption, section id) each, in page order."""
    figures = [(_forest(groups, out / f"{prefix}forest.png", experiment),
                "Test accuracy of every configuration (forest plot)", "forest")]
    for fname, title, metric, ylabel, scale in PLOTS[:1]:
        figures.append((_metric_vs_strength(groups, metric, ylabel, title, scale, out / f"{prefix}{fname}",
                                            experiment), title, metric + "-vs-strength"))
    figures.append((_epoch_curves(groups, "accuracy", out / f"{prefix}accuracy_curves.png", experiment),
                    "Validation and training accuracy per epoch", "accuracy-curves"))
    figures.append((_epoch_curves(groups, "loss", out / f"{prefix}loss_curves.png", experiment),
                    "Validation and training loss per epoch", "loss-curves"))
    for k, grid in enumerate(grids_2d(groups), 1):
        figures.append((_heatmap(grid, out / f"{prefix}heatmap_{k}.png", experiment),
                        f"Test accuracy over the {grid[0] or 'grid'} grid ({grid[1]} × {grid[2]})", f"heatmap-{k}"))
    for fname, title, metric, ylabel, scale in PLOTS[1:]:
        figures.append((_metric_vs_strength(groups, metric, ylabel, title, scale, out / f"{prefix}{fname}",
                                            experiment), title, metric + "-vs-strength"))
    keys = varying_dynamics(groups)
    if keys:
        figures.append((_dynamics(groups, keys, out / f"{prefix}dynamics.png", experiment),
                        "Training dynamics per epoch: " + ", ".join(keys), "dynamics"))
    return figures


_TABLE_NOTE = """<p class="note">Configurations are ranked by mean final validation accuracy, never by test accuracy;
one with a diverged or failed seed ranks below every one without. Statistics are over the succeeded seeds: mean,
sample standard deviation and the 95% confidence interval of the mean, mean ± t(0.975, n − 1)·sd/√n (the sd is in
results.csv). Gap = final training accuracy (averaged over the last epoch's steps, with the regularizer active) − test
accuracy, in percentage points. Best validation accuracy is the highest of the per-epoch validation accuracies (median
epoch over seeds). Strength axes are logarithmic only for settings whose values span two decades or more.</p>"""


def _experiment_section(export: dict, groups: list[Group], out: Path, prefix: str, level: int) -> tuple[str, list]:
    experiment = export["experiment"]
    top = best(groups)
    counts: dict[str, int] = {}
    for j in export["jobs"]:
        counts[j["state"]] = counts.get(j["state"], 0) + 1
    if top is not None:
        headline = (f"Best configuration by validation accuracy: <b>{html.escape(top.name)}</b> — validation "
                    f"{_pct(top.val_acc.mean)}%, test {html.escape(_with_ci(top.test_acc, _pct))}% "
                    f"(95% CI, n = {top.num_succeeded} seeds).")
    else:
        headline = "No job of this experiment has finished yet."
    figures = _experiment_plots(groups, out, experiment, prefix) if top is not None else []
    header, rows = html_summary_rows(groups)
    dynamics = varying_dynamics(groups)
    quiet = [k for k in DYNAMICS_METRICS if k not in dynamics]
    quiet_note = (f'<p class="note">Not plotted, constant over every epoch and configuration: {", ".join(quiet)}.</p>'
                  if quiet and top is not None else "")
    h = f"h{level}"
    states = html.escape(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    section = f"""<{h}>{html.escape(experiment)}</{h}>
<p class="note">{len(export['jobs'])} jobs ({states}).</p>
<p class="callout">{headline}</p>
<h3>Results by configuration</h3>
{_html_table(header, rows, 0 if top is not None and top.rank == 1 else None, 1, prefix + "results")}
{_TABLE_NOTE}
{chr(10).join(_embed(p, caption, prefix + sid) for p, caption, sid in figures)}
{quiet_note}"""
    return section, [p for p, _, _ in figures]


def write_report(exports: dict | Sequence[dict], out_dir: str | Path) -> dict:
    """Write report.html (every plot embedded as a base64 PNG), the PNGs and results.csv into out_dir, for one
    experiment or several: with several, the page opens with the comparison against the first (Δ test accuracy and
    Welch's test per shared configuration), then each experiment's section (PNGs prefixed `1_`, `2_`, …).
    Returns {"html": path, "pngs": [paths], "csv": path}."""
    exports = [exports] if isinstance(exports, dict) else list(exports)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [e["experiment"] for e in exports]
    per_experiment = [group_jobs(e) for e in exports]
    csv_path = out / "results.csv"
    csv_path.write_text(render(per_experiment, "csv", names) + "\n")
    pngs: list[Path] = []
    parts = []
    if len(exports) > 1:
        header, rows = comparison_rows(per_experiment)
        delta = _deltas_plot(per_experiment, names, out / "comparison_deltas.png")
        pngs.append(delta)
        legend = ", ".join(f"[{i}] {html.escape(e)}" for i, e in enumerate(names, 1))
        parts.append(f"""<h2 id="comparison">Comparison: {legend}</h2>
{_html_table(header, rows, None, 0, "comparison-table")}
<p class="note">Configurations are matched by variant label and grid settings. Δ = mean test accuracy of [i] − mean
of [1], in percentage points; t, df and the two-sided p are Welch's t-test over the seeds (unequal variances,
Welch–Satterthwaite degrees of freedom); "only in" marks a configuration missing from the other experiment.</p>
{_embed(delta, "Δ test accuracy per shared configuration", "comparison-deltas")}""")
    for i, (export, groups) in enumerate(zip(exports, per_experiment), 1):
        prefix = "" if len(exports) == 1 else f"{i}_"
        section, figures = _experiment_section(export, groups, out, prefix, 2)
        parts.append(section)
        pngs += figures
    title = " vs ".join(names)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>l2cluster report: {html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>l2cluster report: {html.escape(title)}</h1>
<p class="note">Written {time.strftime('%Y-%m-%d %H:%M')} from the l2cluster store.</p>
{chr(10).join(parts)}
</body></html>
"""
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return {"html": html_path, "pngs": pngs, "csv": csv_path}
