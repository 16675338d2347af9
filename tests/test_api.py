"""The Python API on a real store: one small embedded run (2 settings × 2 seeds), its records and DataFrames checked
against the store's own numbers, the same file read with no Ray running, a resubmission to a daemon, bad input."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest

from l2cluster import api
from l2cluster.errors import NotFoundError
from l2cluster.results.aggregate import t_quantile
from l2cluster.results.store import Store, StoreError
from l2cluster.spec import SpecError

SPEC = {"name": "api-test", "model": {"hidden_sizes": [16]}, "data": {"batch_size": 50, "val_size": 100},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 1, "regularizers": [{"name": "l2", "strength": 0.0}],
        "sweep": {"seeds": [0, 1], "grid": {"regularizers.l2.strength": [0.0, 0.01]}}}
STRENGTH = "regularizers.l2.strength"


def test_importing_the_api_imports_neither_torch_nor_ray():
    code = ("import sys, l2cluster, l2cluster.api; l2cluster.open_store; "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, "
            "sorted(m for m in sys.modules if m in ('torch', 'ray'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_mnist_dir):
    """One embedded run through the API, and what it printed on stderr."""
    store = tmp_path_factory.mktemp("api") / "store.db"
    capture = tmp_path_factory.mktemp("api") / "stderr.txt"
    with open(capture, "w") as stream:
        old, sys.stderr = sys.stderr, stream
        try:
            exp = api.run(SPEC, store=store, num_cpus=2, data_dir=tiny_mnist_dir)
        finally:
            sys.stderr = old
    return {"exp": exp, "store": store, "stderr": capture.read_text()}


def stored(store_path):
    """job id → (overrides, seed, final result, epochs) straight from the store's tables."""
    store = Store.open_read_only(store_path)
    try:
        (exp,) = store.experiments()
        return {r["id"]: (json.loads(r["overrides_json"]), r["seed"], store.result(r["id"]), store.epochs(r["id"]))
                for r in store.jobs(exp["id"])}
    finally:
        store.close()


@pytest.mark.slow
def test_run_trains_every_job_and_shows_progress(ran):
    exp = ran["exp"]
    assert exp.name == "api-test" and exp.submission["jobs"] == 4 and exp.submission["new"] == 4
    assert exp.status() == {"succeeded": 4}
    assert f"{exp.id}: 4 job(s), 4 new" in ran["stderr"]
    assert "4/4 done" in ran["stderr"]  # the progress display's final line
    import ray

    assert not ray.is_initialized()  # run() shut its Ray down; everything below reads the store file


@pytest.mark.slow
def test_jobs_records_are_the_stored_final_metrics(ran):
    jobs = ran["exp"].jobs()
    truth = stored(ran["store"])
    assert sorted(j["job"] for j in jobs) == sorted(truth)
    for j in jobs:
        overrides, seed, result, _ = truth[j["job"]]
        assert (j["overrides"], j["seed"], j["state"], j["error"]) == (overrides, seed, "succeeded", None)
        assert j[STRENGTH] == overrides[STRENGTH]
        assert j["settings"] == ("strength=0" if overrides[STRENGTH] == 0 else "strength=0.01")
        for metric in ("val_acc", "test_acc", "test_loss", "epochs_run", "weight_norm"):
            assert j[metric] == result["final"][metric]
        assert j["test_acc"] > 0.5  # the tiny stand-in is learnable: a broken run would sit near 0.1
    frame = jobs.to_pandas()
    assert frame.shape[0] == 4 and list(frame.columns[:4]) == ["job", "experiment", "label", "settings"]
    assert frame.set_index("job")["test_acc"].to_dict() == {k: v[2]["final"]["test_acc"] for k, v in truth.items()}


@pytest.mark.slow
def test_results_are_mean_sd_and_t_interval_over_seeds(ran):
    results = ran["exp"].results()
    truth = stored(ran["store"])
    assert len(results) == 2 and [r["rank"] for r in results] == [1, 2]
    assert results[0]["val_acc_mean"] >= results[1]["val_acc_mean"]  # ranked by validation accuracy
    for r in results:
        accs = [res["final"]["test_acc"] for o, _, res, _ in truth.values() if o[STRENGTH] == r[STRENGTH]]
        assert r["n"] == 2 and r["seeds"] == [0, 1] and r["num_failed"] == 0
        assert r["test_acc_mean"] == pytest.approx(statistics.mean(accs), abs=1e-12)
        assert r["test_acc_sd"] == pytest.approx(statistics.stdev(accs), abs=1e-12)
        half = t_quantile(0.975, 1) * statistics.stdev(accs) / math.sqrt(2)
        assert (r["test_acc_ci_low"], r["test_acc_ci_high"]) == pytest.approx((r["test_acc_mean"] - half,
                                                                               r["test_acc_mean"] + half))
    frame = results.to_pandas()
    assert frame.set_index(STRENGTH)["rank"].to_dict() == {r[STRENGTH]: r["rank"] for r in results}
    by_seed = ran["exp"].results(by=["seed"])
    assert sorted(r["seed"] for r in by_seed) == [0, 1] and all(r["n"] == 2 for r in by_seed)


@pytest.mark.slow
def test_epochs_are_long_form_with_one_row_per_job_epoch_and_metric(ran):
    epochs = ran["exp"].epochs()
    truth = stored(ran["store"])
    expected = {(job, m["epoch"], k): v for job, (_, _, _, rows) in truth.items() for m in rows
                for k, v in m.items() if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {(e["job"], e["epoch"], e["metric"]): e["value"] for e in epochs} == expected
    assert len(epochs) == len(expected) and {"val_acc", "train_loss", "lr"} <= {e["metric"] for e in epochs}
    frame = epochs.to_pandas()
    assert list(frame.columns) == ["job", "label", "settings", STRENGTH, "seed", "epoch", "metric", "value"]
    wide = frame[frame.metric == "val_acc"].pivot_table(index="seed", columns=STRENGTH, values="value")
    assert wide.shape == (2, 2)
    some = next(e for e in epochs if e["metric"] == "val_acc")
    assert wide.loc[some["seed"], some[STRENGTH]] == some["value"]


@pytest.mark.slow
def test_open_store_reads_the_file_with_no_ray_and_no_torch(ran):
    exp_id = ran["exp"].id
    code = ("import json, sys\nfrom l2cluster.api import open_store\n"
            f"s = open_store({str(ran['store'])!r})\n"
            "print(json.dumps([list(s.experiments()), s.experiment('api-test').results()]))\n"
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    experiments, results = json.loads(done.stdout)
    assert [(e["experiment"], e["num_jobs"], e["succeeded"]) for e in experiments] == [(exp_id, 4, 4)]
    assert results == json.loads(json.dumps(ran["exp"].results()))


@pytest.mark.slow
def test_open_store_finds_experiments_by_prefix_and_names_unknown_ones(ran):
    reader = api.open_store(ran["store"])
    exp_id = ran["exp"].id
    assert reader.experiment(exp_id).id == exp_id
    assert reader.experiment(exp_id[: len("api-test-") + 3]).id == exp_id
    with pytest.raises(NotFoundError, match=rf"no experiment 'nope'; recent: {exp_id}"):
        reader.experiment("nope")
    assert reader.experiment(exp_id).wait(progress=False).status() == {"succeeded": 4}  # ended: returns at once
    with pytest.raises(ValueError, match=r"by=optimizer.nope: no job of api-test-\w+ has this field"):
        reader.experiment(exp_id).results(by=["optimizer.nope"])


@pytest.mark.slow
def test_submit_to_a_daemon_on_the_same_store_reuses_every_result(ran, tiny_mnist_dir):
    from support import local_daemon

    with local_daemon(ran["store"], num_cpus=2, data_dir=str(tiny_mnist_dir)):
        exp = api.submit(SPEC)
        assert (exp.id, exp.submission["reused"], exp.submission["new"]) == (ran["exp"].id, 4, 0)
        assert exp.wait(progress=False).results() == ran["exp"].results()  # read through the coordinator
        with pytest.raises(KeyError, match="no experiment 'nope'"):
            api.Experiment("nope", exp._source).jobs()
        with pytest.raises(SpecError) as e:  # validated by the daemon, with the plugins it loaded
            api.submit({**SPEC, "optimizer": {"name": "adam", "lr": 0.01, "foo": 1}})
        assert "optimizer.foo" in e.value.render()


def test_a_bad_spec_dict_names_the_field_before_anything_starts(tmp_path):
    bad = {**SPEC, "optimizer": {"name": "adam", "lr": 0.01, "foo": 1}}
    with pytest.raises(SpecError) as e:
        api.run(bad, store=tmp_path / "store.db")
    assert [i.path for i in e.value.issues] == ["optimizer.foo"] and "remove it" in e.value.issues[0].message
    assert not (tmp_path / "store.db").exists()
    with pytest.raises(TypeError, match="spec: expected a file path, a dict or a parsed spec, got int"):
        api.submit(42)


def test_a_parsed_spec_model_and_a_file_give_the_same_spec(tmp_path):
    from l2cluster.spec import parse_spec

    registry = api.load_plugins()
    model = parse_spec(SPEC, registry)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC))
    from_model, _ = api.spec_data(model)
    from_file, source = api.spec_data(path)
    assert source == str(path)
    assert parse_spec(from_model, registry) == parse_spec(from_file, registry) == model


def test_open_store_refuses_a_missing_file_and_to_pandas_names_the_extra(tmp_path, monkeypatch):
    with pytest.raises(StoreError, match="no such store file"):
        api.open_store(tmp_path / "missing.db")
    records = api.Records([{"a": 1}])
    assert records.to_pandas()["a"].tolist() == [1]
    assert list(api.Records([], columns=["a", "b"]).to_pandas().columns) == ["a", "b"]
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(ImportError, match=r"pip install 'l2cluster\[pandas\]'"):
        records.to_pandas()


def test_a_prefix_that_matches_several_experiments_names_them(tmp_path):
    store = Store(tmp_path / "store.db")
    for i in (1, 2):
        store.add_experiment(f"api-test-0000000{i}", "api-test", {}, [], now=float(i))
    store.close()
    reader = api.open_store(tmp_path / "store.db")
    assert [(e["experiment"], e["num_jobs"]) for e in reader.experiments()] == [("api-test-00000001", 0),
                                                                                ("api-test-00000002", 0)]
    with pytest.raises(NotFoundError, match="experiment prefix 'api-test' is ambiguous: it matches "
                                            "api-test-00000001, api-test-00000002; give more of the id"):
        reader.experiment("api-test")
    exp = reader.experiment("api-test-00000002")
    assert (exp.id, exp.name, exp.results(), exp.jobs(), exp.epochs()) == ("api-test-00000002", "api-test", [], [], [])
    assert list(exp.epochs().to_pandas().columns) == ["job", "label", "settings", "seed", "epoch", "metric", "value"]
