"""Look at the HTML report in a real browser: build a report from a store, screenshot it with headless Chromium at a
1000 px wide window, and print the page's laid-out width against the window's (a table or figure wider than the
window shows as `page_width > window`).

    python bench/report_screenshot.py --store PATH EXP [EXP ...] -o DIR     # a real store (e.g. after `l2cluster run`)
    python bench/report_screenshot.py --example -o DIR                      # a made-up store: every kind of figure

`--example` writes a store with invented but plausible numbers (two experiments; no regularizer, an L2 sweep over
two decades, a dropout sweep, a 2-D grid of L2 strength × learning rate, a decaying learning rate), so the layout
of every figure and of the comparison can be checked in seconds without training. Needs Debian's `chromium`
(`apt-get install -y chromium`). Open DIR/screenshot.png to look at the page.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLE_SPEC = {
    "name": "report-example", "optimizer": {"name": "adam", "lr": 0.003}, "epochs": 4, "model": {"hidden_sizes": [32]},
    "sweep": {"seeds": [0, 1, 2], "variants": [
        {"label": "none", "set": {"regularizers": []}},
        {"label": "l2", "set": {"regularizers": [{"name": "l2"}]},
         "grid": {"regularizers.l2.strength": [1e-5, 1e-4, 1e-3]}},
        {"label": "dropout", "set": {"regularizers": [{"name": "dropout"}]},
         "grid": {"regularizers.dropout.p": [0.1, 0.3, 0.5]}},
        {"label": "l2-lr", "set": {"regularizers": [{"name": "l2"}]},
         "grid": {"regularizers.l2.strength": [1e-5, 1e-3], "optimizer.lr": [0.001, 0.003, 0.01]}},
    ]},
}


def example_accuracy(overrides: dict, seed: int, shift: float = 0.0) -> float:
    """A made-up final test accuracy: best at a moderate strength, noisy over seeds."""
    acc = 0.962 + shift
    if "regularizers.l2.strength" in overrides:
        acc += 0.004 - 0.0015 * abs(math.log10(overrides["regularizers.l2.strength"]) + 4)
    if "regularizers.dropout.p" in overrides:
        acc += 0.006 - 0.02 * (overrides["regularizers.dropout.p"] - 0.25) ** 2
    if "optimizer.lr" in overrides:
        acc -= 0.002 * abs(math.log10(overrides["optimizer.lr"] / 0.003))
    return acc + random.Random(f"{sorted(overrides.items())}{seed}{shift}").gauss(0, 0.0015)


def write_example_store(path: Path) -> list[str]:
    """Two experiments in a new store at `path` (the second: a later run of the first two variants, slightly
    better); returns their ids."""
    from l2cluster.records import JobResult
    from l2cluster.registry import load_registry
    from l2cluster.results.store import Store
    from l2cluster.spec import expand, parse_spec
    from l2cluster.states import JobState, Outcome

    registry = load_registry(use_entry_points=False)
    second = {**EXAMPLE_SPEC, "name": "report-example-b",
              "sweep": {**EXAMPLE_SPEC["sweep"], "variants": EXAMPLE_SPEC["sweep"]["variants"][:2]}}
    store = Store(path)
    ids = []
    try:
        for exp_id, spec, shift in (("example-a", EXAMPLE_SPEC, 0.0), ("example-b", second, 0.003)):
            jobs = expand(parse_spec(spec, registry), registry)
            store.add_experiment(exp_id, spec["name"], spec, jobs)
            for job in jobs:
                test = example_accuracy(job.overrides, job.seed, shift)
                lr0 = job.overrides.get("optimizer.lr", 0.003)
                store.transition(job.id, JobState.PLACING)
                store.transition(job.id, JobState.RUNNING)
                for epoch in range(1, 5):
                    val = test - 0.012 / epoch + 0.001 * (job.seed - 1)
                    store.record_epoch(job.id, epoch, {
                        "epoch": epoch, "val_acc": val, "train_acc": val + 0.01 - 0.004 / epoch,
                        "val_loss": 4 * (1 - val) + 0.1 / epoch, "train_loss": 3 * (1 - val) + 0.2 / epoch,
                        "lr": lr0 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / 4)),
                        "grad_norm": 1.5 / epoch + 0.1 * job.seed, "clipped_steps": 0})
                store.finish(job.id, JobResult(Outcome.SUCCEEDED, {
                    "val_acc": val, "test_acc": test, "test_loss": 4 * (1 - test),
                    "train_acc": test + 0.02 - 0.002 * job.seed,
                    "val_loss": 0.12 + 0.25 / 4, "train_loss": 0.15, "weight_norm": 30 - 2 * math.log10(
                        job.overrides.get("regularizers.l2.strength", 1e-6)), "best_val_acc": None,
                    "best_epoch": None, "epochs_run": 4}))
            ids.append(exp_id)
    finally:
        store.close()
    return ids


def find_chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


def page_width(browser: str, html_path: Path, width: int) -> int:
    """The laid-out width of the page (document scrollWidth, px) in a `width` px wide window."""
    probe = html_path.with_name("width_probe.html")
    script = ("<script>document.body.setAttribute('data-scroll-width', "
              "Math.max(document.documentElement.scrollWidth, document.body.scrollWidth));</script></body>")
    probe.write_text(html_path.read_text(encoding="utf-8").replace("</body>", script), encoding="utf-8")
    try:
        dom = _chromium(browser, f"--window-size={width},900", "--dump-dom", probe.resolve().as_uri()).stdout
    finally:
        probe.unlink()
    found = re.search(r'data-scroll-width="(\d+)"', dom)
    if not found:
        raise RuntimeError(f"chromium did not lay out {html_path} (no width in its DOM dump)")
    return int(found.group(1))


def screenshot(browser: str, html_path: Path, png: Path, width: int, height: int) -> Path:
    _chromium(browser, f"--screenshot={png.resolve()}", f"--window-size={width},{height}",
              html_path.resolve().as_uri())
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {png}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="*", metavar="EXP")
    parser.add_argument("--store", help="the store file to read")
    parser.add_argument("--example", action="store_true", help="write a made-up store into DIR and report on it")
    parser.add_argument("-o", "--output", required=True, metavar="DIR")
    parser.add_argument("--width", type=int, default=1000, help="window width in px (default 1000)")
    parser.add_argument("--height", type=int, default=6000, help="screenshot height in px (default 6000)")
    args = parser.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.example:
        store_path, experiments = out / "example.db", None
        if store_path.exists():
            store_path.unlink()
        experiments = write_example_store(store_path)
    elif args.store and args.experiments:
        store_path, experiments = Path(args.store), args.experiments
    else:
        parser.error("give --store PATH and one or more experiment ids, or --example")
    browser = find_chromium()
    if browser is None:
        print("no chromium on PATH: apt-get install -y chromium", file=sys.stderr)
        return 2

    from l2cluster.results.aggregate import export_experiment
    from l2cluster.results.report import write_report
    from l2cluster.results.store import Store

    store = Store.open_read_only(store_path)
    try:
        exports = [export_experiment(store, e) for e in experiments]
    finally:
        store.close()
    html_path = write_report(exports, out)["html"]
    png = screenshot(browser, html_path, out / "screenshot.png", args.width, args.height)
    width = page_width(browser, html_path, args.width)
    verdict = "fits" if width <= args.width else "OVERFLOWS"
    print(f"{html_path}\n{png}\npage_width={width}px window={args.width}px: {verdict}")
    return 0 if width <= args.width else 1


if __name__ == "__main__":
    sys.exit(main())
