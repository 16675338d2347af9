"""The command line as a user meets it: fast commands that import neither torch nor Ray, `--version`, a description
and an example for every subcommand, `--format table|json|csv`, `--store` wherever a command reads the store, job
and experiment ids by unique prefix, global options after the subcommand, a closed pipe, NO_COLOR."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
import structlog
from support import registry
from test_aggregate import OUTCOMES, SPEC, _fill

from l2cluster import __version__
from l2cluster.cli import COMMANDS, _subcommands, build_parser, main
from l2cluster.log import configure_logging
from l2cluster.results.store import Store
from l2cluster.spec import expand, parse_spec


def _python(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)


@pytest.fixture
def store(tmp_path):
    """A store with one experiment of 9 jobs (3 configurations × 3 seeds), every job ended."""
    path = tmp_path / "store.db"
    store = Store(path)
    jobs = expand(parse_spec(SPEC, registry()), registry())
    store.add_experiment("agg-1a2b3c4d", "agg", SPEC, jobs)
    _fill(store, jobs)
    store.close()
    return {"path": str(path), "jobs": jobs}


@pytest.mark.parametrize("command", [
    ["--help"], ["status", "--store", "STORE"], ["status", "agg", "--store", "STORE"],
    ["results", "agg", "--store", "STORE"], ["logs", "JOB", "--store", "STORE"],
    ["results", "agg", "--jobs", "--format", "csv", "--store", "STORE"], ["store", "check", "--store", "STORE"],
])
def test_reading_commands_import_neither_torch_nor_ray(store, command):
    command = [store["path"] if a == "STORE" else store["jobs"][0].id[:8] if a == "JOB" else a for a in command]
    check = ("import sys, runpy; sys.argv = ['l2cluster', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('l2cluster.cli', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print('IMPORTED', 'torch' in sys.modules, 'ray' in sys.modules, code, file=sys.stderr)")
    run = _python("-c", check, *command)
    assert run.stderr.splitlines()[-1] == "IMPORTED False False 0", run.stderr
    assert run.stdout


def test_version_and_every_subcommand_has_a_description_and_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"l2cluster {__version__}"
    names = [name for name, _ in _subcommands(build_parser())]
    assert {"run", "status", "logs", "plugins show"} <= set(names)
    for name in names:
        description, example = COMMANDS[name]
        assert description.endswith(".") and example.startswith("l2cluster "), name
    with pytest.raises(SystemExit):
        main(["logs", "--help"])
    out = capsys.readouterr().out
    assert COMMANDS["logs"][0] in " ".join(out.split()) and "examples:\n  l2cluster logs 94494366" in out


def test_status_and_logs_read_a_store_file_with_ids_by_unique_prefix(store, capsys):
    assert main(["status", "--store", store["path"]]) == 0
    out = capsys.readouterr().out
    assert "agg-1a2b3c4d" in out and "succeeded=8" in out and "diverged=1" in out
    assert main(["status", "agg", "--store", store["path"]]) == 0  # a unique prefix of the experiment id
    assert len(capsys.readouterr().out.splitlines()) == 2 + 9
    job = store["jobs"][0].id
    assert main(["logs", job[:6], "--store", store["path"]]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"job {job}  (agg-1a2b3c4d, succeeded)" and out.count("\nepoch ") == 3

    ids = sorted(j.id for j in store["jobs"])
    shared = max((os.path.commonprefix([a, b]) for a, b in zip(ids, ids[1:])), key=len)  # held by 2 ids or more
    # Prefix lookups never treat characters as SQL wildcards.
    for text, message in [("zz", "no job 'zz'"), ("%", "no job '%'"), ("_", "no job '_'"),
                          (shared, f"job prefix {shared!r} is ambiguous: it matches {ids[0] if not shared else ''}")]:
        assert main(["logs", text, "--store", store["path"]]) == 2
        assert message in capsys.readouterr().err
    assert main(["status", "nope", "--store", store["path"]]) == 2
    assert "no experiment 'nope'; recent: agg-1a2b3c4d" in capsys.readouterr().err


def test_one_format_option_gives_table_json_and_csv(store, capsys):
    assert main(["status", "agg", "--store", store["path"], "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 9 and {r["state"] for r in records} == {"succeeded", "diverged"}
    assert main(["status", "agg", "--store", store["path"], "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["job"] for r in rows] == [r["job"] for r in records]

    job = store["jobs"][0]
    assert main(["logs", job.id[:8], "--store", store["path"], "--format", "csv"]) == 0
    epochs = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [float(e["train_loss"]) for e in epochs] == [1.0, 0.5, 1.0 / 3]
    assert main(["logs", job.id[:8], "--store", store["path"], "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["job"]["job"] == job.id and info["result"]["outcome"] == "succeeded"

    assert main(["results", "agg", "--jobs", "--store", store["path"], "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    for row in rows:  # the stored numbers, unrounded (test_aggregate.OUTCOMES)
        expected = OUTCOMES[(row["label"], json.loads(row["settings"]).get("regularizers.l2.strength"))]
        assert row["test_acc"] == ("" if row["state"] == "diverged" else str(expected["test"][int(row["seed"])]))
    assert {r["state"] for r in rows} == {"succeeded", "diverged"}
    assert [r["error"] for r in rows if r["state"] == "diverged"] == ["loss became non-finite in epoch 2"]

    assert main(["plugins", "show", "l2", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "l2" and [f["field"] for f in shown["fields"]] == ["strength", "exclude_bias_and_1d"]
    assert main(["plugins", "show", "l2", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "field,type,default,required,doc"


def test_the_global_plugin_dir_works_after_the_subcommand_too(tmp_path, capsys):
    (tmp_path / "shrink.py").write_text(
        "from pydantic import BaseModel, ConfigDict\nfrom l2cluster.plugin import Regularizer\n\n\n"
        "class Shrink(Regularizer):\n    name = 'shrink'\n\n    class Config(BaseModel):\n"
        "        model_config = ConfigDict(extra='forbid')\n\n    def after_step(self, params):\n        pass\n")
    before = ["--plugin-dir", str(tmp_path), "plugins", "list"]
    after = ["plugins", "list", "--plugin-dir", str(tmp_path)]
    for argv in (before, after):
        assert main(argv) == 0
        assert "shrink " in capsys.readouterr().out


def test_a_closed_pipe_is_not_an_error():
    run = subprocess.run(f"{sys.executable} -m l2cluster.cli schema | head -2", shell=True, capture_output=True,
                         text=True, executable="/bin/bash", env={**os.environ, "PYTHONUNBUFFERED": ""})
    assert run.stdout.splitlines() == ["{", '  "$defs": {'] and "Traceback" not in run.stderr, run.stderr
    first = subprocess.Popen([sys.executable, "-m", "l2cluster.cli", "schema"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    first.stdout.read(10)
    first.stdout.close()  # the reader goes away early
    _, err = first.communicate()
    assert first.returncode == 0 and b"Traceback" not in err, err


@pytest.mark.parametrize("env, colored", [({"NO_COLOR": "1"}, False), ({"FORCE_COLOR": "1"}, True), ({}, False)])
def test_log_colors_follow_no_color_and_force_color(monkeypatch, capsys, env, colored):
    for key in ("NO_COLOR", "FORCE_COLOR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    configure_logging(json=False)  # stderr is captured: not a terminal
    structlog.get_logger("test").info("job_started", job="abc")
    assert ("\x1b[" in capsys.readouterr().err) is colored
