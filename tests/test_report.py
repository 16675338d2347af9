"""A real tiny experiment on a local Ray, end to end: `submit --wait` shows progress, `results` gives the stored
numbers in every format (through the coordinator and straight from the store file alike), experiments compare side
by side, and `report` writes an HTML file that embeds every plot, each PNG a real, non-blank image."""

from __future__ import annotations

import base64
import csv
import io
import json
import re

import pytest
import ray
import yaml
from PIL import Image

from l2cluster.aggregate import summarize
from l2cluster.cli import main
from l2cluster.daemon import start_coordinator, start_local_ray
from l2cluster.store import Store

pytestmark = pytest.mark.slow

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
PNGS = ["test_acc_vs_strength.png", "loss_curves.png", "gap_vs_strength.png", "weight_norm_vs_strength.png"]


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
    assert rows["dropout p=0.5"].split()[-3:] == ["-", "-", "-"]


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
