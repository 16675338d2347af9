"""Presenting aggregated results: the results table in four formats, the plots, and the self-contained HTML report.

Everything here reads `l2cluster.aggregate.Group`s; nothing is recomputed. Plots are drawn with matplotlib's
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

from l2cluster.aggregate import Group, Stat, best, compare, format_value, group_jobs

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


def comparison_rows(per_experiment: Sequence[Sequence[Group]]) -> tuple[list[str], list[list[str]]]:
    """Several experiments side by side, matched by configuration; `[i]` marks the i-th experiment."""
    header = ["configuration"]
    for i in range(1, len(per_experiment) + 1):
        header += [f"n [{i}]", f"val acc % [{i}]", f"test acc % ± 95% CI [{i}]"]
    rows = []
    for row in compare(per_experiment):
        cells = [row["name"]]
        for g in row["groups"]:
            cells += ["-", "-", "-"] if g is None else [_n(g), _pct(g.val_acc.mean), _with_ci(g.test_acc, _pct)]
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
    return {k: sorted(v, key=lambda g: g.axis.x) for k, v in series.items()}, refs


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
        for g, s in zip(members, stats):
            if g is top:
                ax.plot([g.axis.x], [s.mean * scale], marker="*", markersize=18, color=_BEST_COLOR, linestyle="none",
                        label=f"best by val acc: {g.axis.knob.split()[-1]}={format_value(g.axis.x)}", zorder=5)
        for i, ref in enumerate(refs):
            s = getattr(ref, metric)
            color = _BEST_COLOR if ref is top else _REF_COLORS[i % len(_REF_COLORS)]
            ax.axhline(s.mean * scale, color=color, linestyle="--", linewidth=2.5 if ref is top else 1.2,
                       label=f"{_ref_name(ref)}{' — best by val acc' if ref is top else ''}")
            if s.half_width:
                ax.axhspan((s.mean - s.half_width) * scale, (s.mean + s.half_width) * scale, color=color, alpha=0.12)
        if all(x > 0 for x in xs):
            ax.set_xscale("log")
        # Ticks at the swept values, written as in the spec (1e-4, 0.5), instead of 2×10⁻¹.
        ax.set_xticks(xs, [format_value(x) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(f"{members[0].axis.knob}" + (" (log scale)" if all(x > 0 for x in xs) else ""))
        ax.set_title(name + ("  ★ best" if top in members else ""), color=_BEST_COLOR if top in members else "black",
                     fontweight="bold" if top in members else "normal")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in axes:
        ax.set_ylabel(ylabel)
        ax.yaxis.set_tick_params(labelleft=True)
    n = sorted({g.num_succeeded for g in groups if g.num_succeeded})
    fig.suptitle(f"{title} — {experiment}\nmean over seeds (n = {'/'.join(map(str, n))}), "
                 "error bars: 95% CI (Student t)", fontsize=11)
    fig.savefig(path, dpi=110)
    return path


def _loss_curves(groups: Sequence[Group], path: Path, experiment: str) -> Path:
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    series, refs = _panels(groups)
    top = best(groups)
    panels = list(series.items()) or [("all configurations", refs)]
    fig, axes = _figure(len(panels))
    cmap = colormaps["viridis"]
    for ax, (name, members) in zip(axes, panels):
        handles = []
        lines = [(g, cmap(0.85 * i / max(1, len(members) - 1)), False) for i, g in enumerate(members)]
        if series:
            lines += [(r, _REF_COLORS[i % len(_REF_COLORS)], True) for i, r in enumerate(refs)]
        for g, color, is_ref in lines:
            color = _BEST_COLOR if g is top else color
            width = 2.8 if g is top else 1.4
            epochs = [c["epoch"] for c in g.curves]
            ax.plot(epochs, [c["val_loss"] for c in g.curves], "-o", color=color, linewidth=width, markersize=3)
            ax.plot(epochs, [c["train_loss"] for c in g.curves], "--", color=color, linewidth=width)
            if g.axis.x is not None:
                label = f"{g.axis.knob.split()[-1]}={format_value(g.axis.x)}"
            else:
                label = _ref_name(g) if is_ref else g.axis.series
            handles.append(Line2D([], [], color=color, linewidth=width, label=label + (" ★ best" if g is top else "")))
        handles += [Line2D([], [], color="black", linestyle="-", marker="o", markersize=3, label="validation"),
                    Line2D([], [], color="black", linestyle="--", label="train (during the epoch)")]
        ax.legend(handles=handles, fontsize=8, loc="upper right")
        ax.set_title(name + ("  ★ best" if top in members else ""), color=_BEST_COLOR if top in members else "black",
                     fontweight="bold" if top in members else "normal")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("cross-entropy loss (nats)")
        ax.yaxis.set_tick_params(labelleft=True)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Validation and training loss per epoch — {experiment}\nmean over seeds, per configuration",
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
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td:nth-child(2) { text-align: left; }
tr.best td { background: #fde2e4; font-weight: bold; }
.callout { background: #fde2e4; border-left: 4px solid crimson; padding: 0.6em 1em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0 1.5em; }
.note { color: #555; font-size: 13px; }
"""


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], best_row: int | None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        ('<tr class="best">' if i == best_row else "<tr>") + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
        for i, r in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(export: dict, out_dir: str | Path) -> dict:
    """Write report.html (every plot embedded as a base64 PNG), the PNGs and results.csv into out_dir.
    Returns {"html": path, "pngs": [paths], "csv": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    experiment = export["experiment"]
    groups = group_jobs(export)
    top = best(groups)
    pngs = [_metric_vs_strength(groups, metric, ylabel, title, scale, out / fname, experiment)
            for fname, title, metric, ylabel, scale in PLOTS[:1]]
    pngs.append(_loss_curves(groups, out / "loss_curves.png", experiment))
    pngs += [_metric_vs_strength(groups, metric, ylabel, title, scale, out / fname, experiment)
             for fname, title, metric, ylabel, scale in PLOTS[1:]]
    csv_path = out / "results.csv"
    csv_path.write_text(render([groups], "csv", [experiment]) + "\n")

    header, rows = summary_rows(groups)
    counts: dict[str, int] = {}
    for j in export["jobs"]:
        counts[j["state"]] = counts.get(j["state"], 0) + 1
    if top is not None:
        headline = (f"Best configuration by validation accuracy: <b>{html.escape(top.name)}</b> — validation "
                    f"{_pct(top.val_acc.mean)}%, test {html.escape(_with_ci(top.test_acc, _pct))}% "
                    f"(95% CI, n = {top.num_succeeded} seeds).")
    else:
        headline = "No job of this experiment has finished yet."
    images = []
    for p in pngs:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        images.append(f"<h2>{html.escape(_caption(p.name))}</h2>\n"
                      f"<img alt=\"{html.escape(p.name)}\" src=\"data:image/png;base64,{data}\">")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>l2cluster report: {html.escape(experiment)}</title>
<style>{_CSS}</style></head><body>
<h1>l2cluster report: {html.escape(experiment)}</h1>
<p class="note">{len(export['jobs'])} jobs ({html.escape(', '.join(f'{v} {k}' for k, v in sorted(counts.items())))});
written {time.strftime('%Y-%m-%d %H:%M')} from the l2cluster store.</p>
<p class="callout">{headline}</p>
<h2>Results by configuration</h2>
{_html_table(header, rows, 0 if top is not None and top.rank == 1 else None)}
<p class="note">Configurations are ranked by mean final validation accuracy, never by test accuracy; one with a
diverged or failed seed ranks below every one without. Statistics are over the succeeded seeds: mean, sample
standard deviation and the 95% confidence interval of the mean, mean ± t(0.975, n − 1)·sd/√n. Gap = final training
accuracy (averaged over the last epoch's steps, with the regularizer active) − test accuracy, in percentage points.
Best validation accuracy is the highest of the per-epoch validation accuracies (median epoch over seeds).</p>
{chr(10).join(images)}
</body></html>
"""
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return {"html": html_path, "pngs": pngs, "csv": csv_path}


def _caption(name: str) -> str:
    for fname, title, *_ in PLOTS:
        if fname == name:
            return title
    return "Validation and training loss per epoch" if name == "loss_curves.png" else name
