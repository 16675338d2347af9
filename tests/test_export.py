"""`l2cluster export`: a real store (jobs trained by the real trainer on the tiny MNIST stand-in) written as CSV,
Parquet, JSON Lines, TensorBoard event files and MLflow runs, each read back with its own reader (csv, pyarrow,
TensorBoard's EventAccumulator, MlflowClient) and compared number by number with the store."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2cluster.cli import main
from l2cluster.results.aggregate import export_experiment
from l2cluster.results.export import config_params, epoch_records, flatten, mlflow_uri, run_name
from l2cluster.results.store import Store
from l2cluster.spec import expand, experiment_id, parse_spec
from l2cluster.training.data import load_mnist, split_mnist
from l2cluster.training.runner import Member, run_pack
from tests.support import registry

SPEC = {
    "name": "exp-export",
    "model": {"hidden_sizes": [16]},
    "data": {"batch_size": 50, "val_size": 100, "train_size": 300},
    "optimizer": {"name": "adam", "lr": 0.01},
    "epochs": 2,
    "sweep": {"seeds": [0, 1], "variants": [
        {"label": "l2", "set": {"regularizers": [{"name": "l2"}]}, "grid": {"regularizers.l2.strength": [1e-3]}},
        {"label": "grad_clip", "set": {"regularizers": [{"name": "grad_clip"}]},
         "grid": {"regularizers.grad_clip.max_norm": [0.5]}},
    ]},
}
PER_EPOCH = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "grad_norm", "clipped_steps")


@pytest.fixture(scope="module")
def stored(tmp_path_factory, tiny_mnist_dir):
    """A store holding one experiment of 2 configurations × 2 seeds: three jobs trained by the real trainer and
    recorded as the coordinator records them (epoch by epoch, then the result), the fourth left queued."""
    tmp = tmp_path_factory.mktemp("export")
    reg = registry()
    spec = parse_spec(SPEC, reg)
    jobs = expand(spec, reg)
    assert len(jobs) == 4
    exp = experiment_id(spec, jobs)
    store = Store(tmp / "store.db")
    store.add_experiment(exp, spec.name, spec.model_dump(mode="json"), jobs)
    splits = split_mnist(load_mnist(tiny_mnist_dir, download=False), val_size=100, train_size=300)
    for job in jobs[:3]:
        store.transition(job.id, "placing")
        store.transition(job.id, "running", node="test")
        run = run_pack([Member(job.id, job.config)], splits, reg, device=torch.device("cpu"),
                       on_epoch=lambda job_id, epoch, m: store.record_epoch(job_id, epoch, m))
        r = run.results[job.id]
        store.finish(job.id, r)
    export = export_experiment(store, exp)
    store.close()
    return {"exp": exp, "store": str(tmp / "store.db"), "export": export, "tmp": tmp}


def _cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _export(stored, fmt, dest) -> str:
    code, out, err = _cli(["export", stored["exp"], "--format", fmt, "-o", str(dest), "--store", stored["store"]])
    assert code == 0, err
    return out.strip()


def _trained(stored) -> list[dict]:
    return [j for j in stored["export"]["jobs"] if j["epochs"]]


def test_the_fixture_holds_real_training_numbers(stored):
    jobs = stored["export"]["jobs"]
    assert [j["state"] for j in jobs] == ["succeeded", "succeeded", "succeeded", "queued"]
    for job in _trained(stored):
        assert [m["epoch"] for m in job["epochs"]] == [1, 2]
        assert all(k in job["epochs"][0] for k in PER_EPOCH)
        assert job["epochs"][0]["train_loss"] != job["epochs"][1]["train_loss"]
    assert "penalty_l2" in jobs[0]["epochs"][0] and "penalty_l2" not in jobs[2]["epochs"][0]


def test_records_one_per_job_and_epoch_with_a_row_for_the_job_without_epochs(stored):
    records = epoch_records(stored["export"])
    assert [(r["job"], r["epoch"]) for r in records] == [
        (j["job"], e) for j in stored["export"]["jobs"] for e in ([1, 2] if j["epochs"] else [None])]
    first = records[0]
    job = stored["export"]["jobs"][0]
    assert first["settings"] == {"regularizers.l2.strength": 1e-3}
    assert (first["label"], first["seed"], first["state"]) == ("l2", 0, "succeeded")
    assert first["final"] == job["result"]["final"] and first["final"]["test_acc"] > 0
    assert flatten(first)["final.test_acc"] == job["result"]["final"]["test_acc"]


def test_csv_is_wide_one_row_per_job_epoch_with_the_stored_numbers(stored):
    path = _export(stored, "csv", stored["tmp"] / "out.csv")
    rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    assert len(rows) == 3 * 2 + 1
    header = list(rows[0])
    assert header[:8] == ["experiment", "job", "label", "seed", "state", "group", "settings.regularizers.l2.strength",
                          "epoch"]
    assert "settings.regularizers.grad_clip.max_norm" in header and "penalty_l2" in header
    assert header[-1].startswith("final.") and "final.test_acc" in header
    for job in _trained(stored):
        mine = [r for r in rows if r["job"] == job["job"]]
        for row, m in zip(mine, job["epochs"], strict=True):
            assert int(row["epoch"]) == m["epoch"]
            for key in (*PER_EPOCH, "epoch_s"):
                assert float(row[key]) == m[key], key  # repr round-trips a float exactly
            assert float(row["final.test_acc"]) == job["result"]["final"]["test_acc"]
    queued = rows[-1]
    assert (queued["state"], queued["epoch"], queued["val_acc"]) == ("queued", "", "")


def test_parquet_has_typed_columns_equal_to_the_store(stored):
    import pyarrow.parquet as pq

    path = _export(stored, "parquet", stored["tmp"] / "out.parquet")
    table = pq.read_table(path)
    assert table.num_rows == 7
    assert str(table.schema.field("val_acc").type) == "double"
    assert str(table.schema.field("clipped_steps").type) == "int64"
    rows = table.to_pylist()
    expected = [flatten(r) for r in epoch_records(stored["export"])]
    for row, want in zip(rows, expected, strict=True):
        assert {k: row[k] for k in want} == want
        assert row.keys() == {k for r in expected for k in r}


def test_jsonl_one_object_per_line_with_settings_and_final_nested(stored):
    path = _export(stored, "jsonl", stored["tmp"] / "out.jsonl")
    lines = Path(path).read_text().splitlines()
    assert len(lines) == 7
    records = [json.loads(line) for line in lines]
    assert records == epoch_records(stored["export"])  # every value finite here, so nothing became null
    assert records[1]["settings"] == {"regularizers.l2.strength": 1e-3} and records[1]["epoch"] == 2


def test_jsonl_writes_non_finite_numbers_as_null(stored, tmp_path):
    from l2cluster.results.export import write_jsonl

    export = json.loads(json.dumps(stored["export"]))
    export["jobs"][0]["epochs"][1]["train_loss"] = math.inf
    export["jobs"][0]["epochs"][1]["val_loss"] = math.nan
    record = json.loads(write_jsonl(export, tmp_path / "x.jsonl").read_text().splitlines()[1])
    assert record["train_loss"] is None and record["val_loss"] is None
    assert record["val_acc"] == export["jobs"][0]["epochs"][1]["val_acc"]


def test_tensorboard_runs_scalars_and_hparams_read_back_with_tensorboards_reader(stored):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    root = stored["tmp"] / "tb"
    assert _export(stored, "tensorboard", root) == str(root)
    jobs = stored["export"]["jobs"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(run_name(j) for j in jobs)

    top = EventAccumulator(str(root)).Reload()
    (experiment,) = [t for t in top.Tags()["tensors"] if t == metadata.EXPERIMENT_TAG]
    exp = metadata.parse_experiment_plugin_data(
        top.SummaryMetadata(experiment).plugin_data.content)
    assert {h.name for h in exp.hparam_infos} == {"regularizers.l2.strength", "regularizers.grad_clip.max_norm",
                                                  "seed", "label"}
    label_info = next(h for h in exp.hparam_infos if h.name == "label")
    assert list(label_info.domain_discrete) == ["grad_clip", "l2"]
    assert [m.name.tag for m in exp.metric_infos] == ["val_acc", "val_loss", "final/test_acc", "final/test_loss",
                                                      "train_acc", "train_loss"]

    for job in jobs:
        acc = EventAccumulator(str(root / run_name(job))).Reload()
        start = metadata.parse_session_start_info_plugin_data(
            acc.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content)
        assert start.group_name == job["group_key"]
        assert start.hparams["seed"].number_value == job["seed"]
        assert start.hparams["label"].string_value == job["label"]
        (path, value), = job["overrides"].items()
        assert start.hparams[path].number_value == value
        if not job["epochs"]:
            assert acc.Tags()["scalars"] == []
            assert metadata.SESSION_END_INFO_TAG not in acc.Tags()["tensors"]
            continue
        end = metadata.parse_session_end_info_plugin_data(
            acc.SummaryMetadata(metadata.SESSION_END_INFO_TAG).plugin_data.content)
        assert end.status == 1  # STATUS_SUCCESS
        for key in (*PER_EPOCH, "epoch_s"):
            events = acc.Scalars(key)
            assert [e.step for e in events] == [1, 2]
            # TensorBoard stores scalars as float32
            assert [e.value for e in events] == pytest.approx([m[key] for m in job["epochs"]], rel=1e-6), key
        # the time between two epochs' events is the second epoch's stored training time
        events = acc.Scalars("val_acc")
        # (wall times are seconds since 1970 as doubles: their difference is exact to ~1e-6 s)
        assert events[1].wall_time - events[0].wall_time == pytest.approx(job["epochs"][1]["epoch_s"], abs=1e-6)
        (test_acc,) = acc.Scalars("final/test_acc")
        assert (test_acc.step, test_acc.value) == (2, pytest.approx(job["result"]["final"]["test_acc"], rel=1e-6))


def test_tensorboard_refuses_a_folder_that_is_not_empty(stored, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    code, _, err = _cli(["export", stored["exp"], "--format", "tensorboard", "-o", str(tmp_path),
                         "--store", stored["store"]])
    assert code == 2
    assert f"{tmp_path}: not an empty folder" in err and "new or empty folder" in err


def test_mlflow_parent_and_child_runs_params_and_metric_history(stored):
    from mlflow.tracking import MlflowClient

    folder = stored["tmp"] / "mlruns"
    uri = _export(stored, "mlflow", folder)
    assert uri == mlflow_uri(folder) == f"sqlite:///{folder.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    mlexp = client.get_experiment_by_name("exp-export")
    runs = client.search_runs([mlexp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags["l2cluster.kind"] == "experiment"]
    assert parent.info.run_name == stored["exp"] and parent.info.status == "RUNNING"  # a job is still queued
    children = {r.data.tags["l2cluster.job"]: r for r in runs if r.data.tags["l2cluster.kind"] == "job"}
    assert set(children) == {j["job"] for j in stored["export"]["jobs"]}
    for job in stored["export"]["jobs"]:
        run = children[job["job"]]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_name == run_name(job)
        assert run.data.params == config_params(job["config"])
        params, (path, value) = run.data.params, *job["overrides"].items()
        assert (params["optimizer.lr"], params["seed"], params["model.hidden_sizes"]) == ("0.01", str(job["seed"]),
                                                                                         "[16]")
        assert params[path] == str(value) and params["regularizers"] == json.dumps([job["label"]])
        if not job["epochs"]:
            assert run.data.metrics == {} and run.info.status == "RUNNING"
            continue
        assert run.info.status == "FINISHED"
        for key in (*PER_EPOCH, "epoch_s"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted((m.step, m.value) for m in history) == [(m["epoch"], m[key]) for m in job["epochs"]], key
        assert run.data.metrics["final/test_acc"] == job["result"]["final"]["test_acc"]

    code, _, err = _cli(["export", stored["exp"], "--format", "mlflow", "-o", str(folder), "--store", stored["store"]])
    assert code == 2 and f"{stored['exp']} is already in {uri}" in err


def test_bad_input_exits_2_with_the_reason(stored, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", stored["exp"], "--format", "xlsx", "-o", str(tmp_path / "x"), "--store", stored["store"]])
    assert e.value.code == 2 and "invalid choice: 'xlsx'" in capsys.readouterr().err

    code, _, err = _cli(["export", "nope-12345678", "--format", "csv", "-o", str(tmp_path / "x.csv"),
                         "--store", stored["store"]])
    assert code == 2 and "no experiment 'nope-12345678'" in err and stored["exp"] in err

    code, _, err = _cli(["export", stored["exp"], "--format", "csv", "-o", str(tmp_path / "missing" / "x.csv"),
                         "--store", stored["store"]])
    assert code == 2 and f"{tmp_path / 'missing' / 'x.csv'}: cannot write" in err

    code, _, err = _cli(["export", stored["exp"], "--format", "jsonl", "-o", str(tmp_path), "--store", stored["store"]])
    assert code == 2 and f"{tmp_path} is a folder; pass a file path" in err

    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = _cli(["export", stored["exp"], "--format", "tensorboard", "-o", str(blocker / "tb"),
                         "--store", stored["store"]])
    assert code == 2 and "cannot create the folder" in err


def test_config_params_name_list_entries_by_plugin_as_sweep_paths_do():
    config = {"optimizer": {"lr": 0.01, "betas": [0.9, 0.999]}, "epochs": 2, "model": {"activation": "relu"},
              "regularizers": [{"name": "l2", "strength": 1e-4}, {"name": "dropout", "p": [0.1, 0.2]}]}
    assert config_params(config) == {
        "optimizer.lr": "0.01", "optimizer.betas": "[0.9, 0.999]", "epochs": "2", "model.activation": "relu",
        "regularizers.l2.strength": "0.0001", "regularizers.dropout.p": "[0.1, 0.2]",
        "regularizers": '["l2", "dropout"]'}
    # the same plugin twice: the list as JSON, rather than one entry hiding the other
    twice = {"regularizers": [{"name": "l2", "strength": 1}, {"name": "l2", "strength": 2}]}
    assert config_params(twice) == {"regularizers": json.dumps(twice["regularizers"])}


@pytest.mark.slow
def test_export_through_the_daemon_equals_export_from_the_store_file(tmp_path, tiny_mnist_dir):
    """Without --store, `export` asks the coordinator (as `results` does): the same records as from the file."""
    import yaml

    from tests.support import local_daemon

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "name": "exp-daemon", "sweep": {**SPEC["sweep"], "seeds": [0]}}))
    store = tmp_path / "store.db"
    with local_daemon(store, num_cpus=1, data_dir=str(tiny_mnist_dir)):
        code, out, err = _cli(["submit", str(spec), "--wait"])
        assert code == 0, err
        exp = out.splitlines()[0]
        code, out, err = _cli(["export", exp, "--format", "jsonl", "-o", str(tmp_path / "daemon.jsonl")])
        assert code == 0, err
    code, _, err = _cli(["export", exp, "--format", "jsonl", "-o", str(tmp_path / "file.jsonl"), "--store",
                         str(store)])
    assert code == 0, err
    from_daemon = (tmp_path / "daemon.jsonl").read_text()
    assert from_daemon == (tmp_path / "file.jsonl").read_text()
    records = [json.loads(line) for line in from_daemon.splitlines()]
    assert [(r["label"], r["epoch"], r["state"]) for r in records] == [
        ("l2", 1, "succeeded"), ("l2", 2, "succeeded"), ("grad_clip", 1, "succeeded"), ("grad_clip", 2, "succeeded")]


def test_follow_writes_tensorboard_runs_while_the_jobs_train(tmp_path, tiny_mnist_dir):
    """`export --follow` on a store that a trainer is filling: each epoch shows in TensorBoard before its job ends,
    the follower stops when every job has, and the runs hold each epoch once, as the store does."""
    import threading

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    from tests.support import wait_for

    reg = registry()
    spec = parse_spec({**SPEC, "sweep": {**SPEC["sweep"], "seeds": [0]}}, reg)
    jobs = expand(spec, reg)
    exp = experiment_id(spec, jobs)
    store = Store(tmp_path / "store.db")
    store.add_experiment(exp, spec.name, spec.model_dump(mode="json"), jobs)
    root = tmp_path / "tb"
    codes = []
    follower = threading.Thread(target=lambda: codes.append(main([
        "export", exp, "--format", "tensorboard", "-o", str(root), "--follow", "--interval", "0.1",
        "--store", str(tmp_path / "store.db")])))
    follower.start()
    splits = split_mnist(load_mnist(tiny_mnist_dir, download=False), val_size=100, train_size=300)
    seen_live = []

    def written(run):
        """The val_acc steps in a run's event files so far, and whether its session has ended."""
        if not run.is_dir():
            return [], False
        acc = EventAccumulator(str(run)).Reload()
        steps = [e.step for e in acc.Scalars("val_acc")] if "val_acc" in acc.Tags()["scalars"] else []
        return steps, metadata.SESSION_END_INFO_TAG in acc.Tags()["tensors"]

    def on_epoch(job_id, epoch, m):
        store.record_epoch(job_id, epoch, m)
        run = root / run_name(store_jobs[job_id])

        def shown():
            w = written(run)
            return w if epoch in w[0] else None

        seen_live.append((job_id, epoch, wait_for(shown, f"epoch {epoch} of {job_id} in TensorBoard", timeout_s=30)))

    try:
        store_jobs = {j["job"]: j for j in export_experiment(store, exp, epochs=False)["jobs"]}
        for job in jobs:
            store.transition(job.id, "placing")
            store.transition(job.id, "running")
            r = run_pack([Member(job.id, job.config)], splits, reg, device=torch.device("cpu"),
                         on_epoch=on_epoch).results[job.id]
            store.finish(job.id, r)
        follower.join(timeout=30)
        assert not follower.is_alive() and codes == [0]
        export = export_experiment(store, exp)
    finally:
        store.close()
        follower.join(timeout=30)
    # each epoch was in TensorBoard before the next one trained (and before its job ended)
    assert seen_live == [(j.id, e, (list(range(1, e + 1)), False)) for j in jobs for e in (1, 2)]
    for job in export["jobs"]:
        acc = EventAccumulator(str(root / run_name(job))).Reload()
        for key in ("val_acc", "train_loss", "grad_norm"):
            assert [(e.step, e.value) for e in acc.Scalars(key)] == [
                (m["epoch"], pytest.approx(m[key], rel=1e-6)) for m in job["epochs"]]
        assert acc.Scalars("final/test_acc")[0].value == pytest.approx(job["result"]["final"]["test_acc"], rel=1e-6)
        assert metadata.SESSION_END_INFO_TAG in acc.Tags()["tensors"]


def test_follow_is_for_tensorboard_only(stored, tmp_path):
    code, _, err = _cli(["export", stored["exp"], "--format", "csv", "-o", str(tmp_path / "x.csv"), "--follow",
                         "--store", stored["store"]])
    assert code == 2 and "--follow writes TensorBoard runs" in err


def test_importing_the_export_module_imports_neither_torch_nor_ray():
    code = ("import sys, l2cluster.results.export; "
            "print(sorted(m for m in ('torch', 'ray', 'tensorboard', 'mlflow', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
