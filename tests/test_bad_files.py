"""Corrupt, missing and locked files through the CLI and a real daemon: a clear error naming the file, exit code 2
for the command that cannot start (a job that cannot load its data fails instead), the daemon keeps serving, and
nothing is overwritten."""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
import textwrap

import pytest
from support import run_cli, spec_file

from l2cluster.cli import main
from l2cluster.results.store import Store

TINY = {"model": {"hidden_sizes": [8]}, "data": {"batch_size": 50, "val_size": 100},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 1}
LABELS = "train-labels-idx1-ubyte.gz"


write_spec = functools.partial(spec_file, base=TINY)  # write_spec(directory, name, **fields)


def corrupt_store(directory):
    path = directory / "store.db"
    path.write_bytes(b"this is not sqlite " * 100)
    return path


def listing(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def broken_mnist(source, directory):
    """A copy of the tiny MNIST with the training labels cut in half (a truncated download)."""
    directory.mkdir()
    for f in source.iterdir():
        shutil.copy(f, directory / f.name)
    labels = directory / LABELS
    labels.write_bytes(labels.read_bytes()[: len(labels.read_bytes()) // 2])
    return directory


def test_run_refuses_a_corrupt_store_before_starting_anything(tmp_path, capsys):
    store_dir = tmp_path / "s"
    store_dir.mkdir()
    store = corrupt_store(store_dir)
    before = listing(store_dir)
    assert main(["run", write_spec(tmp_path, "t"), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert f"error: {store}: not a healthy l2cluster store (file is not a database); it was left untouched" in err
    assert "Traceback" not in err
    assert listing(store_dir) == before  # byte-identical, and no -wal/-shm files beside it


def test_daemon_start_refuses_a_corrupt_store_and_starts_no_daemon(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("L2CLUSTER_HOME", str(tmp_path / "home"))
    store_dir = tmp_path / "s"
    store_dir.mkdir()
    store = corrupt_store(store_dir)
    before = listing(store_dir)
    assert main(["daemon", "start", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "not a healthy l2cluster store" in err and "Traceback" not in err
    assert listing(store_dir) == before
    assert not (tmp_path / "home" / "daemon.json").exists()


def test_run_on_a_locked_store_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "store.db"
    Store(path).close()
    before = path.read_bytes()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert main(["run", write_spec(tmp_path, "t"), "--store", str(path)]) == 2  # waits the store's 10 s
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert path.read_bytes() == before
    err = capsys.readouterr().err
    assert "cannot open the store (database is locked); another process may hold it locked" in err


def test_train_names_a_corrupt_or_missing_mnist_file_and_touches_nothing(tmp_path, tiny_mnist_dir, capsys):
    data = broken_mnist(tiny_mnist_dir, tmp_path / "data")
    before = listing(data)
    spec = write_spec(tmp_path, "t")
    assert main(["train", spec, "--data-dir", str(data), "--no-download"]) == 2
    err = capsys.readouterr().err
    assert f"{data / LABELS}: expected a valid gzip stream" in err and "delete it and download again" in err
    (data / LABELS).unlink()
    del before[LABELS]
    assert main(["train", spec, "--data-dir", str(data), "--no-download"]) == 2
    err = capsys.readouterr().err
    assert "MNIST file(s) missing: train-labels-idx1-ubyte" in err and "Downloading is disabled" in err
    assert "Traceback" not in err
    assert listing(data) == before


@pytest.mark.slow  # a local Ray and a coordinator
def test_run_with_corrupt_mnist_fails_the_job_with_the_reason(tmp_path, tiny_mnist_dir, capsys):
    data = broken_mnist(tiny_mnist_dir, tmp_path / "data")
    before = listing(data)
    code = main(["run", write_spec(tmp_path, "t"), "--data-dir", str(data), "--store", str(tmp_path / "store.db"),
                 "--num-cpus", "1"])
    out, err = capsys.readouterr()
    assert code == 1 and " failed " in out and "Traceback" not in err
    (job,) = Store.open_read_only(tmp_path / "store.db").jobs()
    assert job["error"].startswith(f"the coordinator cannot load MNIST: {data / LABELS}: expected a valid gzip")
    assert listing(data) == before


@pytest.mark.slow
def test_a_real_daemon_refuses_bad_input_fails_jobs_on_bad_data_and_keeps_serving(tmp_path, tiny_mnist_dir):
    """Every step through real `l2cluster` processes and the real daemon process: exit codes, no tracebacks."""
    env = {**os.environ, "L2CLUSTER_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    data = broken_mnist(tiny_mnist_dir, tmp_path / "data")
    good_labels = (tiny_mnist_dir / LABELS).read_bytes()
    before = listing(data)
    store = tmp_path / "store.db"
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: t\noptimizer: {name: adam\n")
    start = ["daemon", "start", "--data-dir", str(data), "--num-cpus", "2", "--max-jobs", "20", "--store", str(store)]
    try:
        run = run_cli(*start, env=env)
        assert run.returncode == 0, run.stderr
        for spec, expected in [
            (str(broken), "not valid YAML"),  # refused by the client
            (write_spec(tmp_path, "bad", regularizers=[{"name": "../../etc"}]), "regularizers[0]"),  # the daemon
            (write_spec(tmp_path, "huge", sweep={"seeds": list(range(21))}),
             "expands to 21 jobs, more than the limit of 20"),
        ]:
            run = run_cli("submit", spec, env=env)
            assert run.returncode == 2 and expected in run.stderr, run.stderr
            assert "Traceback" not in run.stderr
        run = run_cli("submit", write_spec(tmp_path, "on-bad-data"), "--wait", env=env)
        assert run.returncode == 1 and " failed " in run.stdout and "Traceback" not in run.stderr, run.stderr
        jobs = Store.open_read_only(store).jobs()
        assert len(jobs) == 1 and "the coordinator cannot load MNIST" in jobs[0]["error"]
        assert listing(data) == before  # nothing overwritten, nothing downloaded over it
        assert run_cli("daemon", "status", env=env).returncode == 0
        (data / LABELS).write_bytes(good_labels)  # the operator fixes the file: the same daemon serves again
        run = run_cli("submit", write_spec(tmp_path, "on-good-data", seed=1), "--wait", env=env)
        assert run.returncode == 0 and " succeeded " in run.stdout, run.stdout + run.stderr
    finally:
        run_cli("daemon", "stop", env=env)


def test_unreadable_spec_files_are_clear_errors(tmp_path, capsys):
    cases = {
        "a directory": (tmp_path, "cannot read the file: Is a directory"),
        "missing": (tmp_path / "nope.yaml", "cannot read the file: No such file or directory"),
    }
    big = tmp_path / "big.yaml"
    big.write_text("description: " + "x" * (17 << 20))
    cases["too large"] = (big, "the file is larger than 16 MiB")
    dup = tmp_path / "dup.json"
    dup.write_text('{"name": "a", "optimizer": {"name": "adam"}, "name": "b"}')
    cases["duplicate json key"] = (dup, "found the key 'name' twice in one object; keep one of them")
    dup_yaml = tmp_path / "dup.yaml"
    dup_yaml.write_text(textwrap.dedent("""
        name: a
        optimizer: {name: adam, lr: 0.1}
        optimizer: {name: sgd}
    """))
    cases["duplicate yaml key"] = (dup_yaml, "line 4, column 1: not valid YAML: found the key 'optimizer' twice")
    for what, (path, message) in cases.items():
        assert main(["validate", str(path)]) == 2, what
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (what, err)
