"""A job's identity includes the code of the plugins it uses: a changed plugin file or package gives new job ids
(its results are not reused), an unchanged one the same ids. The store keeps the versions with each job, queues
ended jobs again on request without mixing old and new results, and the tables show each job's error."""

from __future__ import annotations

import hashlib
import json
import re
import textwrap

import pytest
from support import registry

import l2cluster
from l2cluster.cli import _error_cell, main
from l2cluster.records import JobResult
from l2cluster.registry import PluginChangedError, check_unchanged, current_version, load_registry
from l2cluster.results.store import SCHEMA_VERSION, Store, job_dict
from l2cluster.spec import expand, experiment_id, identity, parse_spec
from l2cluster.states import JobState, Outcome

SHRINK = '''
from pydantic import BaseModel, ConfigDict
from l2cluster.plugin import Regularizer


class Shrink(Regularizer):
    name = "shrink"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        factor: float = 1.0

    def after_step(self, params, hp):
        pass
'''
SPEC = {"name": "ident", "optimizer": {"name": "adam"}, "epochs": 1, "regularizers": [{"name": "shrink"}],
        "sweep": {"seeds": [0, 1]}}


def _jobs(reg, spec=SPEC):
    return expand(parse_spec(spec, reg), reg)


def _sha(path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_a_changed_plugin_file_changes_the_job_ids_and_an_unchanged_one_keeps_them(tmp_path):
    plugin = tmp_path / "shrink.py"
    plugin.write_text(SHRINK)
    first = _jobs(load_registry([tmp_path], use_entry_points=False))
    again = _jobs(load_registry([tmp_path], use_entry_points=False))
    assert [j.id for j in again] == [j.id for j in first]
    assert first[0].plugins == {"shrink": _sha(plugin)}
    assert first[0].group == first[1].group  # seeds still share a group

    plugin.write_text(SHRINK + "\n# a comment is a change of code too\n")
    changed = _jobs(load_registry([tmp_path], use_entry_points=False))
    assert changed[0].plugins == {"shrink": _sha(plugin)} != first[0].plugins
    assert not {j.id for j in changed} & {j.id for j in first}
    assert changed[0].group != first[0].group
    # The config is the same: only the plugin's code tells the jobs apart.
    assert identity(changed[0].config) == identity(first[0].config)


def test_builtin_and_entry_point_versions(tmp_path, monkeypatch):
    dist = tmp_path / "l2cluster_shrink-2.5.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: l2cluster-shrink\nVersion: 2.5\n")
    (dist / "entry_points.txt").write_text("[l2cluster.regularizers]\nshrink = l2c_shrink:Shrink\n")
    (tmp_path / "l2c_shrink.py").write_text(SHRINK)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = load_registry()
    (job, _) = _jobs(reg, {**SPEC, "regularizers": [{"name": "shrink"}, {"name": "l2"}]})
    assert job.plugins == {"shrink": "2.5", "l2": l2cluster.__version__}
    info = reg.get("shrink")
    assert (info.dist, current_version(info)) == ("l2cluster-shrink", "2.5")
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: l2cluster-shrink\nVersion: 2.6\n")  # upgraded
    assert current_version(info) == "2.6"


def test_job_ids_with_plugins_hash_their_versions_and_ids_without_plugins_are_unchanged():
    """Pinned: a job with a plugin hashes {"experiment", "config", "plugins"}; earlier versions hashed only the first
    two, so such jobs get new ids once (their stored results are not reused). A job without plugins keeps its id."""
    data = {"name": "t", "optimizer": {"name": "adam", "lr": 1e-3}, "regularizers": [{"name": "l2"}]}
    (job,) = expand(parse_spec(data, registry()), registry())

    def digest(obj):
        return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]

    cfg = identity(job.config)
    assert job.id == digest({"experiment": "t", "config": cfg, "plugins": {"l2": l2cluster.__version__}})
    assert job.id != digest({"experiment": "t", "config": cfg})  # the id before plugin versions counted
    (plain,) = expand(parse_spec({**data, "regularizers": []}, registry()), registry())
    assert plain.id == digest({"experiment": "t", "config": identity(plain.config)}) and plain.plugins == {}


def test_the_experiment_id_follows_the_plugin_code(tmp_path):
    (tmp_path / "shrink.py").write_text(SHRINK)
    reg = load_registry([tmp_path], use_entry_points=False)
    spec = parse_spec(SPEC, reg)
    before = experiment_id(spec, expand(spec, reg))
    (tmp_path / "shrink.py").write_text(SHRINK + "\n# changed\n")
    reg2 = load_registry([tmp_path], use_entry_points=False)
    spec2 = parse_spec(SPEC, reg2)
    assert experiment_id(spec2, expand(spec2, reg2)) != before
    assert before.startswith("ident-")


def test_a_plugin_file_changed_after_loading_is_refused_with_the_fix(tmp_path):
    plugin = tmp_path / "shrink.py"
    plugin.write_text(SHRINK)
    reg = load_registry([tmp_path], use_entry_points=False)
    loaded = _sha(plugin)
    check_unchanged(reg, ["shrink", "l2"], {"shrink": (loaded, "elsewhere")}, restart="RESTART")  # all the same
    with pytest.raises(PluginChangedError) as info:
        check_unchanged(reg, ["shrink"], {"shrink": ("sha256:0000000000000000", "/client/shrink.py")},
                        restart="RESTART")
    assert str(info.value).startswith(f"plugin 'shrink': this client has version sha256:0000000000000000 "
                                      f"(/client/shrink.py) but the daemon loaded {loaded} ({plugin.resolve()})")
    check_unchanged(reg, ["l2"], {"shrink": ("sha256:0000000000000000", "x")}, restart="RESTART")  # not used: fine

    plugin.write_text(SHRINK + "\n# edited\n")
    with pytest.raises(PluginChangedError) as info:
        check_unchanged(reg, ["shrink"], None, restart="RESTART")
    assert str(info.value) == (f"plugin 'shrink': changed since the daemon loaded it ({loaded} → {_sha(plugin)}, "
                               f"{plugin.resolve()}); restart the daemon to load it: RESTART")


# -- the store ----------------------------------------------------------------------------------------------
def test_the_store_keeps_each_jobs_plugin_versions(tmp_path):
    store = Store(tmp_path / "s.db")
    jobs = _jobs(registry(), {**SPEC, "regularizers": [{"name": "l2"}]})
    store.add_experiment("e-1", "ident", {}, jobs)
    assert job_dict(store.job(jobs[0].id))["plugins"] == {"l2": l2cluster.__version__}
    assert store.job(jobs[0].id)["group_key"] == jobs[0].group


def test_a_schema_3_store_gains_the_plugin_versions_column(tmp_path):
    path = tmp_path / "old.db"
    store = Store(path)
    jobs = _jobs(registry(), {**SPEC, "regularizers": []})
    store.add_experiment("e-1", "ident", {}, jobs)
    store._db.execute("ALTER TABLE jobs DROP COLUMN plugins_json")
    store._db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    store.close()
    reader = Store.open_read_only(path)  # an old store still reads before anything upgrades it
    assert job_dict(reader.job(jobs[0].id))["plugins"] == {}
    reader.close()
    store = Store(path)
    assert store._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert job_dict(store.job(jobs[0].id))["plugins"] == {}  # jobs stored before versions: none known
    store.add_experiment("e-2", "ident", {}, _jobs(registry(), {**SPEC, "regularizers": [{"name": "l2"}]}))
    assert [job_dict(r)["plugins"] for r in store.jobs("e-2")] == [{"l2": l2cluster.__version__}] * 2


def _run_to_the_end(store, job_id, final, epochs):
    store.transition(job_id, JobState.PLACING)
    store.transition(job_id, JobState.RUNNING)
    for m in epochs:
        store.record_epoch(job_id, m["epoch"], m)
    store.finish(job_id, JobResult(Outcome.SUCCEEDED, final, epochs=epochs), attempt=store.job(job_id)["attempts"])


def test_rerun_queues_an_ended_job_again_and_its_new_results_replace_the_old(tmp_path):
    store = Store(tmp_path / "s.db")
    (job, queued) = _jobs(registry(), {**SPEC, "regularizers": []})
    store.add_experiment("e-1", "ident", {}, [job, queued])
    old = [{"epoch": e, "val_acc": 0.1 * e} for e in (1, 2, 3)]
    _run_to_the_end(store, job.id, {"val_acc": 0.3}, old)
    with pytest.raises(ValueError, match="has ended; queue it again with rerun"):
        store.transition(job.id, JobState.QUEUED)

    assert store.rerun([job.id, queued.id], priority=5) == 1  # the queued job is left alone
    row = store.job(job.id)
    assert (row["state"], row["attempts"], row["epoch"], row["priority"], row["finished_at"]) == ("queued", 0, 0, 5,
                                                                                                   None)
    assert store.result(job.id) is None and store.epochs(job.id) == []
    event = store.events(job.id)[-1]
    assert (event["old_state"], event["new_state"], event["detail"]) == ("succeeded", "queued", "rerun requested")

    new = [{"epoch": 1, "val_acc": 0.5}]  # the rerun reports one epoch and ends: nothing of the old three stays
    _run_to_the_end(store, job.id, {"val_acc": 0.5}, new)
    assert store.result(job.id)["final"] == {"val_acc": 0.5} and store.epochs(job.id) == new
    assert store.job(job.id)["attempts"] == 1


# -- the error column ---------------------------------------------------------------------------------------
def test_the_error_cell_is_the_first_line_cut_to_fit():
    assert _error_cell(None) == "-" and _error_cell("") == "-"
    assert _error_cell("short\nsecond line") == "short"
    long = "plugin 'raises', hook 'penalty': RuntimeError: " + "x" * 100
    assert _error_cell(long) == long[:59] + "…" and len(_error_cell(long)) == 60


RAISES = '''
from pydantic import BaseModel, ConfigDict
from l2cluster.plugin import Regularizer


class Raises(Regularizer):
    name = "raises"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        at_step: int = 0

    def penalty(self, params, step, hp):
        if step >= int(hp.at_step[0]):
            raise RuntimeError("the penalty cannot be computed here, for a reason that takes a long sentence\\nline 2")
        return params["layers.0.weight"].flatten(1).sum(1) * 0
'''


def test_train_shows_each_jobs_error(tmp_path, tiny_mnist_dir, capsys):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "raises.py").write_text(textwrap.dedent(RAISES))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "name": "errors", "model": {"hidden_sizes": [8]}, "data": {"batch_size": 100, "val_size": 100},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 1, "regularizers": [{"name": "raises"}],
        "sweep": {"grid": {"regularizers.raises.at_step": [0, 10**6]}}, "scaling": {"pack": False}}))
    code = main(["--plugin-dir", str(tmp_path / "plugins"), "train", str(spec), "--data-dir", str(tiny_mnist_dir),
                 "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 1, out
    header, _, failed, ok = out.splitlines()
    assert header.split()[-2:] == ["pack", "error"]
    # The error's first line, cut to 60 characters.
    cell = "plugin 'raises', hook 'penalty': RuntimeError: the penalty …"
    assert len(cell) == 60 and re.search(r" failed .*  " + re.escape(cell) + "$", failed), failed
    assert re.search(r" succeeded .*\s-$", ok), ok
