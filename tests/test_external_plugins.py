"""The contract from outside: label smoothing, mixup and EMA as a third-party entry-point package (the built-ins'
code, renamed, importing only the public `l2cluster.plugin`), installed with pip in the test run and trained
through `l2cluster run` on a real local Ray with 1 and 2 DDP ranks: the two give the same results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from l2cluster.results.store import Store

BUILTINS = Path(__file__).resolve().parents[1] / "plugins"
PLUGINS = {"ext_label_smoothing": ("label_smoothing", "LabelSmoothing"), "ext_mixup": ("mixup", "Mixup"),
           "ext_ema": ("ema", "EMA")}


def _package(root: Path) -> Path:
    pkg = root / "l2cluster-ext"
    pkg.mkdir()
    for name, (builtin, _cls) in PLUGINS.items():
        source = (BUILTINS / f"{builtin}.py").read_text()
        assert "from l2cluster.plugin import" in source and "l2cluster.training.trainer" not in source
        renamed, n = re.subn(rf'name = "{builtin}"', f'name = "{name}"', source)
        assert n == 1
        (pkg / f"l2cluster_{name}.py").write_text(renamed)
    entry_points = "\n".join(f'{name} = "l2cluster_{name}:{cls}"' for name, (_b, cls) in PLUGINS.items())
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "l2cluster-ext"
        version = "1.2.3"
        dependencies = ["l2cluster"]

        [tool.setuptools]
        py-modules = [{modules}]

        [project.entry-points."l2cluster.regularizers"]
    """).format(modules=", ".join(f'"l2cluster_{n}"' for n in PLUGINS)) + entry_points + "\n")
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "--target", str(site), str(pkg)], check=True)
    return site


@pytest.mark.slow
def test_an_external_package_with_label_smoothing_mixup_and_ema_trains_alike_on_1_and_2_ranks(tmp_path, tiny_mnist_dir):
    site = _package(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "L2CLUSTER_HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    listing = subprocess.run([sys.executable, "-m", "l2cluster.cli", "plugins", "list"], env=env,
                             capture_output=True, text=True, check=True).stdout
    for name in PLUGINS:
        assert re.search(rf"{name}\s+entry point .*\(package l2cluster-ext\).*\sok", listing), listing

    spec = tmp_path / "ext.yaml"
    spec.write_text(textwrap.dedent("""
        name: ext
        model: {hidden_sizes: [32], dtype: float64}
        data: {batch_size: 40, val_size: 100}
        optimizer: {name: adam, lr: 0.01}
        epochs: 2
        regularizers:
          - {name: ext_label_smoothing, epsilon: 0.1}
          - {name: ext_mixup, alpha: 0.4}
          - {name: ext_ema, decay: 0.9}
        sweep:
          grid: {scaling.num_workers: [1, 2]}
    """))
    store = tmp_path / "store.db"
    run = subprocess.run([sys.executable, "-m", "l2cluster.cli", "run", str(spec), "--store", str(store),
                          "--data-dir", str(tiny_mnist_dir), "--num-cpus", "2"],
                         env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout + run.stderr

    db = Store.open_read_only(store)
    jobs = {json.loads(j["config_json"])["scaling"]["num_workers"]: j for j in db.jobs()}
    assert sorted(jobs) == [1, 2] and all(j["state"] == "succeeded" for j in jobs.values())
    one, two = (db.result(jobs[n]["id"]) for n in (1, 2))
    epochs_one, epochs_two = db.epochs(jobs[1]["id"]), db.epochs(jobs[2]["id"])
    # The plugins' versions are the package's, part of the jobs' identity.
    assert json.loads(jobs[1]["plugins_json"]) == {name: "1.2.3" for name in PLUGINS}
    for a, b in zip(epochs_one, epochs_two):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "weight_norm", "penalty_ext_label_smoothing"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
    assert one["final"]["test_acc"] == pytest.approx(two["final"]["test_acc"], abs=1e-12)
    assert one["final"]["test_loss"] == pytest.approx(two["final"]["test_loss"], rel=1e-9)
    assert 0 < epochs_one[-1]["penalty_ext_label_smoothing"] < 1
    assert one["final"]["test_acc"] > 0.5  # learned (chance is 0.1), evaluated on the EMA weights
