"""The store as a file on disk: self-contained after a clean stop (the write-ahead log folded in), `store backup`
and `store check` on real SQLite files, and every file or path that is not a usable store refused in one line
(exit code 2, no traceback) with the file left byte for byte as it was."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support import run_cli
from test_store import SPEC, _jobs

from l2cluster.api import open_store
from l2cluster.results.store import APPLICATION_ID, SCHEMA_VERSION, Store, StoreError, checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_SPEC = "name: t\nmodel: {hidden_sizes: [8]}\noptimizer: {name: adam, lr: 0.01}\nepochs: 1\n"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, env={**os.environ, **(env or {})}, cwd=REPO, timeout=120)


def assert_one_line_error(run: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr and all(f in lines[0] for f in fragments), run.stderr


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def experiments_in(path: Path) -> list[str]:
    """The experiments a copy of store.db alone holds (no -wal beside it)."""
    copy = path.parent / "copy" / path.name
    copy.parent.mkdir(exist_ok=True)
    shutil.copy(path, copy)
    store = Store.open_read_only(copy)
    try:
        return [e["id"] for e in store.experiments()]
    finally:
        store.close()
        shutil.rmtree(copy.parent)


def new_store(path: Path, jobs=None) -> Path:
    store = Store(path)
    store.add_experiment("s-1", "s", SPEC, jobs or _jobs())
    store.close()
    return path


# -- self-contained after a clean stop ------------------------------------------------------------------------
def test_closing_the_writer_folds_the_log_into_store_db_even_while_a_reader_is_connected(tmp_path):
    path = tmp_path / "store.db"
    writer = Store(path)
    writer.add_experiment("s-1", "s", SPEC, _jobs())
    reader = Store.open_read_only(path)  # `status --store` polling: SQLite's own checkpoint-on-last-close never runs
    assert [e["id"] for e in reader.experiments()] == ["s-1"]
    assert experiments_in(path) == []  # the control: while the writer runs, the experiment is only in store.db-wal
    writer.close()
    assert experiments_in(path) == ["s-1"]
    assert os.path.getsize(path.with_name("store.db-wal")) == 0
    reader.close()


def test_the_coordinators_shutdown_closes_the_store(tmp_path):
    from l2cluster.cluster.coordinator import Coordinator

    path = tmp_path / "store.db"
    coordinator = object.__new__(Coordinator.__ray_actor_class__)  # its state, without a Ray actor around it
    coordinator.store, coordinator.gangs, coordinator._loop_task, coordinator._releasing = Store(path), {}, None, set()
    coordinator.store.add_experiment("s-1", "s", SPEC, _jobs())
    reader = Store.open_read_only(path)
    assert experiments_in(path) == []
    asyncio.run(coordinator.shutdown())
    assert experiments_in(path) == ["s-1"]
    reader.close()


def test_checkpoint_folds_the_log_a_killed_writer_left(tmp_path):
    """The daemon's host process checkpoints after Ray is down, for a coordinator that could not close."""
    path = tmp_path / "store.db"
    Store(path).close()
    killed = subprocess.run([sys.executable, "-c", "import os, sys\nsys.path.insert(0, 'tests')\n"
                             "from test_store import SPEC, _jobs\nfrom l2cluster.results.store import Store\n"
                             f"Store({str(path)!r}).add_experiment('s-1', 's', SPEC, _jobs())\nos._exit(0)"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 0, killed.stderr
    assert experiments_in(path) == []  # the control: the killed writer's experiment is only in its log
    checkpoint(path)
    assert experiments_in(path) == ["s-1"]


# -- store backup ---------------------------------------------------------------------------------------------
def test_backup_while_another_connection_writes_is_one_consistent_self_contained_file(tmp_path):
    path = new_store(tmp_path / "store.db")
    jobs = [j.id for j in _jobs()]
    stop, written = threading.Event(), threading.Event()

    def write() -> None:  # each epoch of every job in its own transaction, which also sets jobs.epoch
        store, epoch = Store(path), 0
        while not stop.is_set():
            epoch += 1
            for job in jobs:
                store.record_epoch(job, epoch, {"epoch": epoch, "pad": "x" * 2000})
            if epoch == 20:
                written.set()
        store.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert written.wait(60)
        dest = tmp_path / "backups" / "store-copy.db"
        run = cli("store", "backup", dest, "--store", path)
        live = Store.open_read_only(path)
        epochs_after = live._db.execute("SELECT COUNT(*) FROM epochs").fetchone()[0]
        live.close()
    finally:
        stop.set()
        writer.join()
    assert run.returncode == 0 and run.stdout.strip() == str(dest), run.stderr
    assert sorted(p.name for p in dest.parent.iterdir()) == ["store-copy.db"]  # no -wal, no leftover partial file
    assert dest.read_bytes()[18:20] == b"\x01\x01"  # a rollback-journal file: readable without a log beside it
    copy = sqlite3.connect(dest)
    assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert copy.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    # A snapshot: each job's epoch counter and its stored epochs were copied from the same transaction.
    per_job = copy.execute("SELECT jobs.epoch, MAX(epochs.epoch), COUNT(*) FROM jobs JOIN epochs ON job_id = jobs.id "
                           "GROUP BY jobs.id").fetchall()
    copied = copy.execute("SELECT COUNT(*) FROM epochs").fetchone()[0]
    copy.close()
    assert len(per_job) == 4 and all(a == b == n for a, b, n in per_job), per_job
    assert 80 <= copied < epochs_after  # taken while the writer went on
    before = sha256(dest)
    again = cli("store", "backup", dest, "--store", path)
    assert_one_line_error(again, "already exists")
    assert sha256(dest) == before


# -- store check and a damaged page ---------------------------------------------------------------------------
def corrupt_jobs_table(path: Path) -> int:
    """Overwrite the root page of the jobs table (one page inside a file of many) with garbage; its number."""
    db = sqlite3.connect(path)
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'jobs'").fetchone()[0]
    db.close()
    assert 1 < root < pages and pages > 20
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\x55" * page_size)
    return root


def test_store_check_says_ok_on_a_healthy_store_and_lists_a_damaged_page(tmp_path):
    path = new_store(tmp_path / "store.db", _jobs({**SPEC, "sweep": {"seeds": list(range(100))}}))
    run = cli("store", "check", "--store", path)
    assert (run.returncode, run.stdout.strip(), run.stderr) == (0, f"ok: {path}", "")

    corrupt_jobs_table(path)
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:  # the damage is where SQLite reads: its quick check finds it (or fails on it)
        assert db.execute("PRAGMA quick_check").fetchone()[0] != "ok"
    except sqlite3.DatabaseError as e:
        assert "malformed" in str(e)
    db.close()
    before = sha256(path)
    run = cli("store", "check", "--store", path)
    assert run.returncode == 1 and run.stdout.strip() and "Traceback" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "problem(s)" in run.stderr
    for command in (["results", "s-1"], ["status", "s-1"], ["status"], ["logs", _jobs()[0].id]):
        assert_one_line_error(cli(*command, "--store", path), str(path), "malformed")
    with pytest.raises(StoreError, match="not a healthy l2cluster store .*malformed.* left untouched"):
        Store(path)
    with pytest.raises(StoreError, match="cannot read the store .*malformed.*store check"):
        open_store(path).experiments()  # the Python API reads through the same seam
    assert sha256(path) == before


# -- files that are not an l2cluster store ----------------------------------------------------------------------
def foreign(path: Path, *statements: str) -> Path:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")  # the journal mode a writer would have to change first
    for s in statements:
        db.execute(s)
    db.close()
    return path


@pytest.mark.parametrize("statements, says", [
    (["CREATE TABLE notes (x)", "INSERT INTO notes VALUES (1)"], "a SQLite database with other tables (notes)"),
    (["CREATE TABLE meta (k, v)", "INSERT INTO meta VALUES ('schema_version', '4')"], "other tables (meta)"),
    (["PRAGMA application_id = 1234", "CREATE TABLE meta (key, value)",
      "INSERT INTO meta VALUES ('schema_version', '4')"], "another application's SQLite database (application_id "
                                                          "0x4d2)"),
    (["PRAGMA user_version = 3"], "an empty SQLite database"),
])
def test_another_applications_sqlite_file_is_refused_untouched(tmp_path, statements, says):
    path = foreign(tmp_path / "other.db", *statements)
    before, listing = sha256(path), sorted(os.listdir(tmp_path))
    with pytest.raises(StoreError, match=r"not an l2cluster store; it was left untouched"):
        Store(path)
    assert_one_line_error(cli("status", "--store", path), says, "not an l2cluster store")
    assert_one_line_error(cli("store", "check", "--store", path), says)
    assert_one_line_error(cli("store", "backup", tmp_path / "b.db", "--store", path), says)
    assert sha256(path) == before and sorted(os.listdir(tmp_path)) == listing


def test_a_store_from_before_the_application_id_is_adopted(tmp_path):
    path = new_store(tmp_path / "store.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA application_id = 0")
    db.execute("PRAGMA user_version = 0")  # as schema 4 stores were written
    db.close()
    assert [e["id"] for e in Store.open_read_only(path).experiments()] == ["s-1"]  # read as it is
    Store(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_an_existing_empty_file_is_refused_and_a_new_store_is_never_left_empty(tmp_path):
    """An empty file at the store path was not made by l2cluster, which builds a new store under a temporary name
    and links it into place whole: it may be a store that lost its contents, so it is refused, not reused."""
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StoreError, match=r"an empty file \(0 bytes\), not an l2cluster store"):
        Store(empty)
    assert_one_line_error(cli("status", "--store", empty), "an empty file (0 bytes)")
    assert empty.stat().st_size == 0

    Store(tmp_path / "new.db").close()
    assert sorted(os.listdir(tmp_path)) == ["empty.db", "new.db"]
    db = sqlite3.connect(tmp_path / "new.db")
    assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    db.close()


# -- paths that cannot hold a store -----------------------------------------------------------------------------
def test_a_folder_or_a_path_under_a_file_is_a_one_line_error(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("mine")
    store = new_store(tmp_path / "s.db")
    for path, says in ((folder, "is a folder"), (afile / "store.db", "is a file, not a folder"),
                       (afile / "sub" / "store.db", "is a file, not a folder")):
        with pytest.raises(StoreError, match=says):
            Store(path)
        assert_one_line_error(cli("status", "--store", path), says)
        assert_one_line_error(cli("store", "backup", path, "--store", store), says)
    assert_one_line_error(cli("store", "check", "--store", folder), "is a folder")
    spec = tmp_path / "t.yaml"
    spec.write_text(TINY_SPEC)
    for path, says in ((folder, "is a folder"), (afile / "store.db", "is a file, not a folder")):
        run = cli("run", spec, "--store", path, env={"L2CLUSTER_HOME": str(tmp_path / "home")})
        assert_one_line_error(run, says)
        assert "locked" not in run.stderr
    assert afile.read_text() == "mine" and os.listdir(folder) == []


DRIVER = """
import json, subprocess, sys
out = {}
for name, args in json.loads(sys.argv[1]).items():
    run = subprocess.run([sys.executable, "-m", "l2cluster.cli", *args], capture_output=True, text=True)
    out[name] = [run.returncode, run.stdout, run.stderr]
print(json.dumps(out))
"""


def test_a_store_in_a_read_only_folder_is_read_but_never_written(tmp_path):
    """Root ignores chmod, so the folder is made read-only by a read-only bind mount in a private mount
    namespace (unshare -m), which only that namespace sees."""
    probe = tmp_path / "probe"
    probe.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to make a read-only mount")
    tried = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {probe} {probe} && mount -o remount,ro,bind "
                            f"{probe} {probe}"], capture_output=True, text=True)
    if tried.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here (unshare -m / mount refused: {tried.stderr.strip()})")
    ro = tmp_path / "ro"
    path = new_store(ro / "store.db")
    spec = tmp_path / "t.yaml"
    spec.write_text(TINY_SPEC)
    before = {p.name: sha256(p) for p in ro.iterdir()}
    commands = {"status": ["status", "--store", str(path)], "check": ["store", "check", "--store", str(path)],
                "backup_from": ["store", "backup", str(tmp_path / "b.db"), "--store", str(path)],
                "backup_into": ["store", "backup", str(ro / "b.db"), "--store", str(path)],
                "run_existing": ["run", str(spec), "--store", str(path)],
                "run_new": ["run", str(spec), "--store", str(ro / "new.db")]}
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    script = (f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} {ro} && touch {ro}/x 2>/dev/null && exit 9; "
              f"exec {sys.executable} {driver} '{json.dumps(commands)}'")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "L2CLUSTER_HOME": str(tmp_path / "home")}, timeout=300)
    assert done.returncode == 0, done.stderr  # 9: the mount was not read-only
    results = {name: subprocess.CompletedProcess(commands[name], rc, out, err)
               for name, (rc, out, err) in json.loads(done.stdout).items()}
    assert results["status"].returncode == 0 and "s-1" in results["status"].stdout, results["status"].stderr
    assert results["check"].returncode == 0 and results["check"].stdout.strip() == f"ok: {path}"
    assert results["backup_from"].returncode == 0 and (tmp_path / "b.db").is_file()
    for name in ("backup_into", "run_existing", "run_new"):
        assert_one_line_error(results[name], "is read-only")
    assert {p.name: sha256(p) for p in ro.iterdir()} == before


def test_store_commands_default_to_the_daemons_store(monkeypatch, tmp_path):
    from l2cluster.cluster import daemon
    from l2cluster.results.store import default_store as _default_store

    monkeypatch.delenv("L2CLUSTER_HOME", raising=False)
    assert _default_store() == daemon.default_store()
    monkeypatch.setenv("L2CLUSTER_HOME", str(tmp_path))
    assert _default_store() == daemon.default_store() == tmp_path / "store.db"
