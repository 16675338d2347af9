"""The report's figures and comparisons on a made-up store (bench/report_screenshot.py's example: every kind of
figure, in seconds), the page in a real headless Chromium where there is one; then a real tiny experiment on a local
Ray, end to end: `submit --wait` shows progress, `results` gives the stored numbers in every format (through the
coordinator and straight from the store file alike), experiments compare side by side with Welch's test, and
`report` writes an HTML file that embeds every plot, each PNG a real, non-blank image."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import pytest
import ray
import yaml
from PIL import Image
from support import load_script

from l2cluster.cli import main
from l2cluster.cluster.daemon import start_coordinator, start_local_ray
from l2cluster.results.aggregate import export_experiment, group_jobs, summarize, welch
from l2cluster.results.report import axis_scale, baseline, grids_2d, varying_dynamics, write_report
from l2cluster.results.store import Store

BENCH = Path(__file__).resolve().parents[1] / "bench" / "report_screenshot.py"


def load_bench():
    return load_script(BENCH, "report_screenshot")


# -- on a made-up store ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """bench/report_screenshot.py's example store (experiment A: none, l2 over two decades, dropout, a 2-D l2 × lr
    grid; B: none and l2 only) with the report of A alone and of A compared with B."""
    tmp = tmp_path_factory.mktemp("example")
    ids = load_bench().write_example_store(tmp / "store.db")
    store = Store.open_read_only(tmp / "store.db")
    exports = [export_experiment(store, e) for e in ids]
    store.close()
    return {"exports": exports, "groups": [group_jobs(e) for e in exports],
            "single": write_report(exports[0], tmp / "single"), "pair": write_report(exports, tmp / "pair")}


def _sections(page: str) -> list[tuple[str, str]]:
    return re.findall(r'<section id="([^"]+)"><h3>[^<]*</h3>\n<img alt="([^"]+)" src="data:image/png;base64,', page)


def test_axis_scale_is_log_only_over_two_decades():
    assert axis_scale([1e-4, 1e-3, 1e-2]) == "log"
    assert axis_scale([1e-5, 1e-3]) == "log"
    assert axis_scale([0.001, 0.1]) == "log"
    assert axis_scale([0.1, 0.3, 0.5]) == "linear"  # dropout p: a probability
    assert axis_scale([0.0, 0.1, 0.2]) == "linear"  # label smoothing ε with a 0
    assert axis_scale([1e-5, 1e-4]) == "linear"  # one decade
    assert axis_scale([0.1, 5.0]) == "linear"  # 50×
    assert axis_scale([]) == "linear"


def test_single_report_has_every_figure_and_a_heatmap_only_for_the_2d_grid(example):
    a, b = example["groups"]
    assert [(label, x, y, len(m)) for label, x, y, m in grids_2d(a)] == [
        ("l2-lr", "optimizer.lr", "regularizers.l2.strength", 4)]
    assert grids_2d(b) == []  # one-dimensional sweeps only
    assert baseline(a).name == "none"
    assert varying_dynamics(a) == ["lr", "grad_norm"]  # clipped_steps is 0 throughout
    page = example["single"]["html"].read_text()
    assert _sections(page) == [
        ("forest", "forest.png"), ("test_acc-vs-strength", "test_acc_vs_strength.png"),
        ("accuracy-curves", "accuracy_curves.png"), ("loss-curves", "loss_curves.png"),
        ("heatmap-1", "heatmap_1.png"), ("gap-vs-strength", "gap_vs_strength.png"),
        ("weight_norm-vs-strength", "weight_norm_vs_strength.png"), ("dynamics", "dynamics.png")]
    assert "Training dynamics per epoch: lr, grad_norm" in page
    assert "constant over every epoch and configuration: clipped_steps." in page
    for path in example["single"]["pngs"]:
        image = Image.open(path)
        assert image.format == "PNG" and image.width <= 1200, path  # drawn for a 1000 px page: shrunk by 15% at most
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 50, f"{path.name} has almost no colours"
    # The table: no sd column (it is in results.csv), shortened headers, the configuration cell may wrap.
    table = re.search(r'<table id="results">(.*?)</table>', page).group(1)
    headers = re.findall(r"<th>([^<]*)</th>", table)
    assert headers == ["rank", "configuration", "n", "val acc %", "test acc % ± CI", "test loss ± CI",
                       "best val % (epoch)", "gap pp ± CI", "‖θ‖₂", "div."]
    assert table.count('<td class="name">') == len(a) == 11


def test_curves_carry_seed_bands_and_strength_plots_per_seed_points(example):
    a = example["groups"][0]
    none = baseline(a)
    finals = [j for j in example["exports"][0]["jobs"] if j["label"] == "none"]
    last = [max(j["epochs"], key=lambda e: e["epoch"]) for j in finals]
    point = none.curves[-1]
    assert point["epoch"] == 4 and point["n"] == 3
    assert point["val_acc_min"] == min(e["val_acc"] for e in last)
    assert point["val_acc_max"] == max(e["val_acc"] for e in last)
    assert point["val_acc"] == pytest.approx(sum(e["val_acc"] for e in last) / 3, abs=1e-15)
    assert point["val_acc_min"] < point["val_acc"] < point["val_acc_max"]
    assert [r["test_acc"] for r in none.per_seed] == [j["result"]["final"]["test_acc"] for j in
                                                      sorted(finals, key=lambda j: j["seed"])]


def test_two_experiments_compare_with_welch_per_shared_configuration(example):
    a, b = example["groups"]
    page = example["pair"]["html"].read_text()
    assert "<title>l2cluster report: example-a vs example-b</title>" in page
    assert [sid for sid, _ in _sections(page)][:3] == ["comparison-deltas", "1_forest", "1_test_acc-vs-strength"]
    assert ("2_heatmap-1", "2_heatmap_1.png") not in _sections(page) and ("1_heatmap-1", "1_heatmap_1.png") in \
        _sections(page)
    table = re.search(r'<table id="comparison-table">(.*?)</table>', page).group(1)
    rows = {cells[0]: cells for cells in (re.findall(r"<td[^>]*>([^<]*)</td>", r) for r in table.split("<tr>")[2:])}
    assert len(rows) == 11
    assert rows["dropout p=0.3"][-4:] == ["only in [1]", "-", "-", "-"]
    none_a = next(g for g in a if g.name == "none")
    none_b = next(g for g in b if g.name == "none")
    test = welch([r["test_acc"] for r in none_a.per_seed], [r["test_acc"] for r in none_b.per_seed])
    assert test.delta == pytest.approx(none_b.test_acc.mean - none_a.test_acc.mean, abs=1e-15)
    assert rows["none"][-4:] == [f"{100 * test.delta:+.2f}", f"{test.t:.2f}", f"{test.df:.1f}", f"{test.p:.2g}"]


@pytest.mark.slow
def test_the_page_fits_a_1000px_window_in_headless_chromium(tmp_path, capsys):
    bench = load_bench()
    if bench.find_chromium() is None:
        pytest.skip("no chromium on PATH (apt-get install -y chromium)")
    assert bench.main(["--example", "-o", str(tmp_path), "--height", "2000"]) == 0
    out = capsys.readouterr().out
    width = int(re.search(r"page_width=(\d+)px window=1000px: fits", out).group(1))
    assert 900 <= width <= 1000
    shot = Image.open(tmp_path / "screenshot.png")
    assert shot.size == (1000, 2000)
    assert len(shot.convert("RGB").getcolors(maxcolors=1 << 24)) > 50  # the page rendered, images included


# -- a real experiment on a local Ray ----------------------------------------------------------------------------------

# 400 training images (real MNIST where it is available): enough that the configurations differ.
TINY = {"model": {"hidden_sizes": [16]}, "data": {"batch_size": 50, "val_size": 100, "train_size": 400},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 2}
VARIANTS = [
    {"label": "none", "set": {"regularizers": []}},
    {"label": "l2", "set": {"regularizers": [{"name": "l2"}]}, "grid": {"regularizers.l2.strength": [1e-4, 1e-2]}},
    {"label": "decoupled_decay", "set": {"regularizers": [{"name": "decoupled_decay"}]},
     "grid": {"regularizers.decoupled_decay.weight_decay": [1e-2, 1.0]}},
    {"label": "dropout", "set": {"regularizers": [{"name": "dropout"}]},
     "grid": {"regularizers.dropout.p": [0.1, 0.5]}},
    {"label": "grad_clip", "set": {"regularizers": [{"name": "grad_clip"}]},
     "grid": {"regularizers.grad_clip.max_norm": [0.1, 5.0]}},
]
PNGS = ["forest.png", "test_acc_vs_strength.png", "accuracy_curves.png", "loss_curves.png", "gap_vs_strength.png",
        "weight_norm_vs_strength.png", "dynamics.png"]


@pytest.fixture(scope="module")
def experiments(tmp_path_factory, mnist_dir):
    """Two experiments run through a real coordinator: the four regularizers at two strengths plus none (18 jobs),
    and a smaller one sharing some configurations; yields their ids, the store and what `submit --wait` printed."""
    tmp = tmp_path_factory.mktemp("report")
    store = tmp / "store.db"
    start_local_ray(num_cpus=2)
    handle = start_coordinator(store, data_dir=str(mnist_dir), idle_release_s=300, detached=False)
    runs = []
    try:
        for name, variants in (("regs", VARIANTS), ("regs-small", VARIANTS[:2])):
            spec = tmp / f"{name}.yaml"
            spec.write_text(yaml.safe_dump({"name": name, **TINY, "sweep": {"seeds": [0, 1], "variants": variants}}))
            runs.append(_main_output(["submit", str(spec), "--wait"]))
        yield {"ids": [r[1].splitlines()[0] for r in runs], "store": store, "runs": runs, "tmp": tmp}
    finally:
        ray.get(handle.shutdown.remote(), timeout=30)
        ray.shutdown()


def _main_output(argv) -> tuple[int, str, str]:
    import contextlib

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_submit_wait_shows_progress_then_ranked_results(experiments):
    code, out, err = experiments["runs"][0]
    exp = experiments["ids"][0]
    assert code == 0
    progress = [line for line in err.splitlines() if f"] {exp}: " in line]
    assert progress, err
    assert re.search(r"\d+/18 done · \d+ running · \d+ queued \| epochs \d+/36", progress[0])
    assert "18/18 done · 0 running · 0 queued · 18 succeeded | epochs 36/36 (100%)" in progress[-1]
    # The per-job table, then the 9 configurations ranked by validation accuracy.
    assert len([line for line in out.splitlines() if re.match(r"^[0-9a-f]{16}\s", line)]) == 18
    ranked = out[out.index("rank  configuration"):].splitlines()[2:]
    assert [line.split()[0] for line in ranked] == [str(i) for i in range(1, 10)]


@pytest.mark.slow
def test_results_are_the_stored_numbers_in_every_format_from_daemon_and_file(experiments):
    exp, store_path = experiments["ids"][0], str(experiments["store"])
    code, via_daemon, _ = _main_output(["results", exp, "--format", "json"])
    assert code == 0
    code, via_file, _ = _main_output(["results", exp, "--format", "json", "--store", store_path])
    assert code == 0 and json.loads(via_file) == json.loads(via_daemon)
    groups = json.loads(via_daemon)
    assert len(groups) == 9 and [g["rank"] for g in groups] == list(range(1, 10))
    val = [g["val_acc"]["mean"] for g in groups]
    assert val == sorted(val, reverse=True)  # ranked by validation accuracy

    store = Store.open_read_only(store_path)
    by_group: dict[str, list[dict]] = {}
    for job in store.jobs(exp):
        by_group.setdefault(job["group_key"], []).append(store.result(job["id"])["final"])
    for g in groups:
        finals = by_group[g["key"]]
        expected = summarize([f["test_acc"] for f in finals])
        assert g["num_succeeded"] == 2
        assert g["test_acc"]["mean"] == expected.mean and g["test_acc"]["ci_high"] == expected.ci_high
        assert g["gap"]["mean"] == pytest.approx(sum(f["train_acc"] - f["test_acc"] for f in finals) / 2, abs=1e-15)
    store.close()

    code, md, _ = _main_output(["results", exp, "--format", "markdown"])
    lines = md.strip().splitlines()
    assert code == 0 and lines[0].startswith("| rank | configuration | n | val acc % |") and len(lines) == 11
    code, text, _ = _main_output(["results", exp, "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["configuration"] for r in rows] == [g["name"] for g in groups]
    code, by_label, _ = _main_output(["results", exp, "--by", "label", "--format", "csv"])
    assert sorted(r["configuration"] for r in csv.DictReader(io.StringIO(by_label))) == sorted(
        v["label"] for v in VARIANTS)
    code, _, err = _main_output(["results", exp, "--by", "optimizer.nope"])
    assert code == 2 and "--by optimizer.nope: no job of" in err
    code, _, err = _main_output(["results", "no-such-experiment"])
    assert code == 2 and "no experiment 'no-such-experiment'" in err


@pytest.mark.slow
def test_two_experiments_side_by_side(experiments):
    first, second = experiments["ids"]
    code, out, _ = _main_output(["results", first, second])
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"[1] {first}  [2] {second}"
    rows = {line.split("  ")[0].strip(): line for line in lines[3:]}
    assert len(rows) == 9
    # Configurations of both experiments have numbers in both column sets; the others only in the first.
    assert len(re.findall(r"\d+\.\d\d ± \d+\.\d\d", rows["none"])) == 2
    assert re.search(r" [+-]\d+\.\d\d +-?\d+\.\d\d +\d+\.\d +\S+$", rows["none"])  # Δ pp, t, df, p
    assert rows["dropout p=0.5"].split()[-9:] == ["-", "-", "-", "only", "in", "[1]", "-", "-", "-"]


@pytest.mark.slow
def test_report_embeds_every_plot_and_each_png_is_a_real_image(experiments):
    exp = experiments["ids"][0]
    out_dir = experiments["tmp"] / "report"
    code, out, _ = _main_output(["report", exp, "-o", str(out_dir)])
    assert code == 0
    assert out.splitlines()[0] == str(out_dir / "report.html")
    page = (out_dir / "report.html").read_text()
    embedded = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert [name for name, _ in embedded] == PNGS
    assert "<img" not in re.sub(r'<img alt="[^"]+" src="data:image/png;base64,[A-Za-z0-9+/=]+">', "", page)
    for name, data in embedded:
        raw = (out_dir / name).read_bytes()
        assert base64.b64decode(data) == raw  # the HTML embeds exactly the PNG written beside it
        image = Image.open(io.BytesIO(raw))
        image.load()
        assert image.format == "PNG" and image.width >= 800 and image.height >= 400
        gray = image.convert("L")
        histogram = gray.histogram()
        non_white = sum(histogram[:250]) / (image.width * image.height)
        assert non_white > 0.03, f"{name} looks blank"
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 50, f"{name} has almost no colours"
    # The table has one row per configuration, the best one highlighted, and the headline names it.
    assert page.count("<tr") == 10 and page.count('<tr class="best">') == 1
    best = json.loads(_main_output(["results", exp, "--format", "json"])[1])[0]["name"]
    assert f"Best configuration by validation accuracy: <b>{best}</b>" in page
    assert (out_dir / "results.csv").read_text().count("\n") == 10
