"""The store: experiments, jobs, their state changes, per-epoch metrics and final results, in one SQLite file.

WAL mode, one writer (the coordinator), any number of readers. Every state change goes through
`transition`, which checks it against the table in l2cluster.states and records it as an event, so what
`status` and `results` show survives a restart of whatever wrote it. The file is created whole, readable by its
owner only and marked as l2cluster's (SQLite's application_id); a file that is not a healthy l2cluster store is
refused, never changed. Closing the writer folds the write-ahead log into the file, so after a clean stop the
file alone holds everything; `Store.backup` copies a live store.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from l2cluster.errors import InputError, NotFoundError
from l2cluster.packing import pack_key
from l2cluster.records import JobResult
from l2cluster.states import JobState, check_transition

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experiments (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    priority INTEGER NOT NULL,
    submitted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    experiment_id TEXT NOT NULL REFERENCES experiments(id),
    seq INTEGER NOT NULL,
    label TEXT NOT NULL,
    overrides_json TEXT NOT NULL,
    seed INTEGER NOT NULL,
    group_key TEXT NOT NULL,
    config_json TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0,
    node TEXT,
    error TEXT,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    pack_key TEXT,
    shape_json TEXT,
    pack_id TEXT,
    plugins_json TEXT  -- {plugin name: code version}, NULL for jobs stored before schema 4
);
CREATE INDEX IF NOT EXISTS jobs_by_experiment ON jobs(experiment_id, seq);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(state, priority DESC, seq);
-- Which experiments hold which jobs: a job (same experiment name and config) shared by two submissions runs once
-- and shows in both.
CREATE TABLE IF NOT EXISTS experiment_jobs (
    experiment_id TEXT NOT NULL REFERENCES experiments(id),
    job_id TEXT NOT NULL REFERENCES jobs(id),
    seq INTEGER NOT NULL,
    PRIMARY KEY (experiment_id, job_id)
);
CREATE INDEX IF NOT EXISTS experiment_jobs_by_seq ON experiment_jobs(experiment_id, seq);
-- A pack: jobs trained together as one stacked model, in this order. A job keeps its pack until it ends, so a
-- pack that lost its gang resumes with the same members from its checkpoints.
CREATE TABLE IF NOT EXISTS packs (
    id TEXT PRIMARY KEY,
    members_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    at REAL NOT NULL,
    old_state TEXT,
    new_state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_by_job ON events(job_id, at);
CREATE TABLE IF NOT EXISTS epochs (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    epoch INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    PRIMARY KEY (job_id, epoch)
);
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT PRIMARY KEY REFERENCES jobs(id),
    outcome TEXT NOT NULL,
    final_json TEXT NOT NULL,
    diverged_epoch INTEGER,
    error TEXT
);
"""


def home() -> Path:
    """Where the local daemon keeps its state file, log and (by default) the store: $L2CLUSTER_HOME, else
    ~/.local/state/l2cluster."""
    return Path(os.environ.get("L2CLUSTER_HOME") or Path.home() / ".local" / "state" / "l2cluster")


def default_store() -> Path:
    """The local daemon's store file, which `run`, `daemon start` and the store commands use by default."""
    return home() / "store.db"


class StoreError(InputError, RuntimeError):
    """The store file cannot be used (locked, corrupt, from a newer version); names the file and the fix."""


class Store:
    """One SQLite store file. Not thread-safe: one Store per thread (the coordinator's writer has one)."""

    def __init__(self, path: str | Path, *, timeout: float = 10.0):
        self.path = Path(path).expanduser()
        self._writer = True
        _check_writable_location(self.path)
        if not self.path.exists():
            _create(self.path)
        try:
            _identify(self.path)  # before it is opened for writing: another application's file stays untouched
            self._db = _connect_writer(self.path, timeout)
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(_one_line(check))
            self._db.execute("PRAGMA journal_mode=WAL")
            with self._tx():
                for statement in _statements():  # not executescript(): it would commit mid-transaction
                    self._db.execute(statement)
                self._check_version()
        except sqlite3.OperationalError as e:
            self._close_quietly()
            if "locked" not in str(e) and "busy" not in str(e):
                raise StoreError(f"{self.path}: cannot open the store ({e}); check that its folder and file are "
                                 "writable, or point the daemon at another store path") from None
            raise StoreError(f"{self.path}: cannot open the store ({e}); another process may hold it locked — "
                             "stop it, or point the daemon at another store path") from None
        except sqlite3.DatabaseError as e:
            self._close_quietly()
            raise StoreError(f"{self.path}: not a healthy l2cluster store ({_one_line(str(e))}); it was left "
                             "untouched — move it aside or point the daemon at another store path") from None
        except StoreError:
            self._close_quietly()
            raise

    def _close_quietly(self) -> None:
        if getattr(self, "_db", None) is not None:
            self._db.close()

    def _check_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: written by a newer l2cluster (schema {row[0]} > {SCHEMA_VERSION}); "
                             "upgrade l2cluster")
        elif int(row[0]) < SCHEMA_VERSION:
            if int(row[0]) < 2:  # schema 1 knew one experiment per job: record that membership
                self._db.execute("INSERT OR IGNORE INTO experiment_jobs SELECT experiment_id, id, seq FROM jobs")
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
            for column in ("pack_key", "shape_json", "pack_id", "plugins_json"):  # 3: packing, 4: plugin versions
                if column not in columns:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")
            for job_id, config_json in self._db.execute("SELECT id, config_json FROM jobs WHERE shape_json IS NULL "
                                                        "AND state = ?", (JobState.QUEUED.value,)).fetchall():
                config = json.loads(config_json)
                self._db.execute("UPDATE jobs SET pack_key = ?, shape_json = ? WHERE id = ?",
                                 (pack_key(config), shape_json(config), job_id))
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
        # A store from before the application id (schema ≤ 4) is adopted here, by the same transaction.
        self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the store. The writer first moves the write-ahead log into the file (a WAL checkpoint), so that
        after a clean stop store.db alone holds everything; a reader busy at that moment only delays that to the
        next open, which replays the log."""
        if self._writer:
            with suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- writes ---------------------------------------------------------------------------------------------
    def add_experiment(self, experiment_id: str, name: str, spec: dict, jobs: Iterable, *, priority: int = 0,
                       now: float | None = None) -> int:
        """Record an experiment and queue its jobs (l2cluster.spec.sweep.Job). Idempotent: jobs already in the store
        (same id: same experiment name and config, from this or an earlier submission) keep their state and
        results and become part of this experiment too. Returns how many jobs are new."""
        now = time.time() if now is None else now
        added = 0
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO experiments VALUES (?, ?, ?, ?, ?)",
                       (experiment_id, name, json.dumps(spec, sort_keys=True), priority, now))
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0]
            for job in jobs:
                seq += 1
                config = job.config.model_dump(mode="json")
                cur = db.execute(
                    "INSERT OR IGNORE INTO jobs (id, experiment_id, seq, label, overrides_json, seed, group_key, "
                    "config_json, priority, state, submitted_at, pack_key, shape_json, plugins_json) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.id, experiment_id, seq, job.label, json.dumps(job.overrides, sort_keys=True), job.seed,
                     job.group, json.dumps(config, sort_keys=True), priority, JobState.QUEUED.value, now,
                     pack_key(config), shape_json(config), json.dumps(job.plugins, sort_keys=True)))
                db.execute("INSERT OR IGNORE INTO experiment_jobs VALUES (?, ?, ?)", (experiment_id, job.id, seq))
                if cur.rowcount:
                    added += 1
                    db.execute("INSERT INTO events VALUES (?, ?, NULL, ?, 0, 'submitted')",
                               (job.id, now, JobState.QUEUED.value))
        return added

    def transition(self, job_id: str, new: JobState | str, *, detail: str | None = None, **fields: Any) -> None:
        """Move a job to a new state (checked against the transition table) and record the event.

        `fields` may set node, error, epoch; entering running counts an attempt (only a start that
        reached training is one) and sets started_at, entering a terminal state sets finished_at."""
        allowed = {"node", "error", "epoch"}
        if set(fields) - allowed:
            raise ValueError(f"transition() cannot set {sorted(set(fields) - allowed)}")
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and JobState(row["state"]).is_terminal and JobState(new) is JobState.QUEUED:
                raise ValueError(f"job {job_id} has ended; queue it again with rerun(), which deletes its result")
            self._transition(db, job_id, new, detail, fields)

    def _transition(self, db: sqlite3.Connection, job_id: str, new, detail, fields: dict) -> None:
        now = time.time()
        row = db.execute("SELECT state, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id!r} in {self.path}")
        state = check_transition(job_id, row["state"], new)
        attempts = row["attempts"] + (state is JobState.RUNNING)
        updates = {"state": state.value, "attempts": attempts, **fields}
        if state is JobState.RUNNING:
            updates["started_at"] = now
        if state.is_terminal:
            updates["finished_at"] = now
        db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in updates)} WHERE id = ?",
                   (*updates.values(), job_id))
        db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
                   (job_id, now, row["state"], state.value, attempts, detail))

    def rerun(self, job_ids: Iterable[str], *, priority: int = 0) -> int:
        """Queue ended jobs again, as new (`submit --rerun`): their result and epochs are deleted in the same
        transaction, so the rerun's are never mixed with them; attempts start again from 0 and the job leaves its
        old pack. Jobs that have not ended are left alone. Returns how many were queued again."""
        n = 0
        with self._tx() as db:
            for job_id in job_ids:
                row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None or not JobState(row["state"]).is_terminal:
                    continue
                db.execute("DELETE FROM results WHERE job_id = ?", (job_id,))
                db.execute("DELETE FROM epochs WHERE job_id = ?", (job_id,))
                db.execute("UPDATE jobs SET attempts = 0, epoch = 0, node = NULL, error = NULL, started_at = NULL, "
                           "finished_at = NULL, pack_id = NULL, priority = ? WHERE id = ?", (priority, job_id))
                self._transition(db, job_id, JobState.QUEUED, "rerun requested", {})
                n += 1
        return n

    def record_epoch(self, job_id: str, epoch: int, metrics: dict) -> None:
        """Store one epoch's metrics (a retried attempt overwrites the epochs it repeats)."""
        with self._tx() as db:
            attempts = db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            db.execute("INSERT OR REPLACE INTO epochs VALUES (?, ?, ?, ?)",
                       (job_id, epoch, attempts, json.dumps(metrics, sort_keys=True)))
            db.execute("UPDATE jobs SET epoch = ? WHERE id = ?", (epoch, job_id))

    def add_note(self, job_id: str, detail: str, *, attempt: int) -> bool:
        """Record something about a job's run that changes nothing in its state (a checkpoint not written): an event
        from its state to the same state, which `logs` lists and `status` shows (the latest of the attempt). A note
        of an attempt other than the job's current one is stale and dropped; returns whether it was recorded."""
        with self._tx() as db:
            row = db.execute("SELECT state, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["attempts"] != attempt:
                return False
            db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
                       (job_id, time.time(), row["state"], row["state"], attempt, detail))
        return True

    def start_pack(self, pack_id: str, job_ids: list[str]) -> None:
        """Record a pack's members (in training order) and put each member into it, in one transaction. Starting
        an existing pack again (a retry) keeps its first record."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO packs VALUES (?, ?, ?)", (pack_id, json.dumps(job_ids), time.time()))
            db.executemany("UPDATE jobs SET pack_id = ? WHERE id = ?", [(pack_id, j) for j in job_ids])

    def pack_members(self, pack_id: str) -> list[str]:
        row = self._db.execute("SELECT members_json FROM packs WHERE id = ?", (pack_id,)).fetchone()
        return json.loads(row[0]) if row else []

    def finish(self, job_id: str, result: JobResult, *, detail: str | None = None, attempt: int | None = None) -> None:
        """Record a job's final result and move it to the terminal state of its outcome, in one transaction: a result
        is never recorded twice, and a job is never terminal without its result. The result's epochs, the run's
        whole per-epoch history, replace what was reported along the way (a report can be lost with a coordinator)
        under `attempt`."""
        state = result.outcome.state
        with self._tx() as db:
            if db.execute("SELECT 1 FROM results WHERE job_id = ?", (job_id,)).fetchone():
                raise ValueError(f"job {job_id}: a result is already recorded")
            db.execute("INSERT INTO results VALUES (?, ?, ?, ?, ?)",
                       (job_id, state.value, json.dumps(result.final, sort_keys=True), result.diverged_epoch,
                        result.error))
            for m in result.epochs:
                db.execute("INSERT OR REPLACE INTO epochs VALUES (?, ?, ?, ?)",
                           (job_id, m["epoch"], attempt or 0, json.dumps(m, sort_keys=True)))
            self._transition(db, job_id, state, result.error or detail, {"error": result.error})

    # -- reads ----------------------------------------------------------------------------------------------
    def queued(self, limit: int | None = None) -> list[sqlite3.Row]:
        """Queued jobs in the order they should start: higher priority first, then submission order."""
        sql = "SELECT * FROM jobs WHERE state = ? ORDER BY priority DESC, seq"
        return self._db.execute(sql + (f" LIMIT {int(limit)}" if limit else ""), (JobState.QUEUED.value,)).fetchall()

    def job(self, job_id: str) -> sqlite3.Row | None:
        return self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

    def jobs(self, experiment_id: str | None = None, states: Iterable[str] | None = None) -> list[sqlite3.Row]:
        sql, args = "SELECT * FROM jobs WHERE 1 = 1", []
        if experiment_id is not None:
            sql = ("SELECT jobs.* FROM experiment_jobs JOIN jobs ON jobs.id = experiment_jobs.job_id "
                   "WHERE experiment_jobs.experiment_id = ?")
            args.append(experiment_id)
        if states is not None:
            states = [JobState(s).value for s in states]
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args += states
        return self._db.execute(sql + " ORDER BY jobs.seq", args).fetchall()

    def experiments(self) -> list[sqlite3.Row]:
        return self._db.execute("SELECT * FROM experiments ORDER BY submitted_at").fetchall()

    def experiment(self, experiment_id: str) -> sqlite3.Row | None:
        return self._db.execute("SELECT * FROM experiments WHERE id = ?", (experiment_id,)).fetchone()

    def counts(self, experiment_id: str) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM experiment_jobs JOIN jobs ON jobs.id = job_id "
                                "WHERE experiment_jobs.experiment_id = ? GROUP BY state", (experiment_id,)).fetchall()
        return {JobState(r[0]).value: r[1] for r in rows}

    def epochs(self, job_id: str) -> list[dict]:
        rows = self._db.execute("SELECT metrics_json FROM epochs WHERE job_id = ? ORDER BY epoch", (job_id,))
        return [json.loads(r[0]) for r in rows]

    def result(self, job_id: str) -> dict | None:
        row = self._db.execute("SELECT * FROM results WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        return {"outcome": row["outcome"], "final": json.loads(row["final_json"]),
                "diverged_epoch": row["diverged_epoch"], "error": row["error"]}

    def resolve_job(self, text: str) -> str:
        """A job id from the id or a unique prefix of it, as git takes commits (`logs 94494366`); KeyError saying
        what matched otherwise."""
        return self._resolve("job", text, "SELECT id FROM jobs WHERE id >= ? AND id < ? ORDER BY id LIMIT 6",
                             "`l2cluster status EXPERIMENT` lists job ids")

    def resolve_experiment(self, text: str) -> str:
        """An experiment id from the id or a unique prefix of it (`quickstart` for `quickstart-5a46e6ab`)."""
        recent = ", ".join(e["id"] for e in self.experiments()[-5:]) or "none"
        return self._resolve("experiment", text,
                             "SELECT id FROM experiments WHERE id >= ? AND id < ? ORDER BY id LIMIT 6",
                             f"recent: {recent}")

    def _resolve(self, kind: str, text: str, sql: str, hint: str) -> str:
        # Prefix match by range ([text, text + U+10FFFF)), so ids with LIKE's wildcards are matched literally.
        ids = [r[0] for r in self._db.execute(sql, (text, text + "\U0010ffff")).fetchall()]
        if text in ids:
            return text
        if len(ids) == 1:
            return ids[0]
        if not ids:
            raise NotFoundError(f"no {kind} {text!r}; {hint}")
        shown = ", ".join(ids[:5]) + (", …" if len(ids) > 5 else "")
        raise NotFoundError(f"{kind} prefix {text!r} is ambiguous: it matches {shown}; give more of the id")

    def notes(self, experiment_id: str) -> dict[str, str]:
        """Job id → the latest note (add_note) of the job's current attempt, for the jobs of an experiment that
        have one. A job waiting for its next attempt (queued, placing: attempts count only starts) has none."""
        rows = self._db.execute(
            "SELECT events.job_id, events.detail FROM experiment_jobs JOIN jobs ON jobs.id = experiment_jobs.job_id "
            "JOIN events ON events.job_id = jobs.id AND events.attempt = jobs.attempts "
            "AND events.old_state = events.new_state WHERE experiment_jobs.experiment_id = ? "
            "AND jobs.state NOT IN (?, ?) ORDER BY events.rowid",
            (experiment_id, JobState.QUEUED.value, JobState.PLACING.value)).fetchall()
        return {job_id: detail for job_id, detail in rows}

    def events(self, job_id: str) -> list[sqlite3.Row]:
        return self._db.execute("SELECT * FROM events WHERE job_id = ? ORDER BY rowid", (job_id,)).fetchall()

    def another_connection(self, *, timeout: float = 10.0) -> Store:
        """A second writing connection to this store (already opened, so already checked and migrated), for a
        large write in a worker thread: an SQLite connection belongs to the thread that made it. Writes of either
        connection wait for the other's transaction (busy timeout). It closes without the WAL checkpoint, which
        is the first writer's to do."""
        other = Store.__new__(Store)
        other.path, other._writer = self.path, False
        other._db = _connect_writer(self.path, timeout)
        return other

    @classmethod
    def open_read_only(cls, path: str | Path, *, timeout: float = 10.0) -> Store:
        """An existing store opened for reading only (`results --store`, `report --store`): it never creates,
        migrates or writes the file, and may run beside the daemon that writes it (WAL lets readers in)."""
        store = cls.__new__(cls)
        store.path, store._writer = Path(path).expanduser(), False
        _check_file_path(store.path)
        if not store.path.is_file():
            raise StoreError(f"{store.path}: no such store file; pass the path the daemon writes (`l2cluster daemon "
                             "status` prints it)")
        try:
            version = _identify(store.path)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{store.path}: not a readable l2cluster store ({_one_line(str(e))})") from None
        if version > SCHEMA_VERSION:
            raise StoreError(f"{store.path}: store schema {version} is not one this l2cluster reads "
                             f"(≤ {SCHEMA_VERSION}); upgrade l2cluster")
        store._db = _connect_read_only(store.path, timeout)
        return store

    # -- the file as a whole ----------------------------------------------------------------------------------
    def integrity_problems(self) -> list[str]:
        """What SQLite's integrity check finds wrong with the file (every page, index and constraint); [] if
        nothing."""
        rows = [r[0] for r in self._db.execute("PRAGMA integrity_check").fetchall()]
        return [] if rows == ["ok"] else [_one_line(r) for r in rows]

    def backup(self, dest: str | Path) -> Path:
        """Copy the store, as one consistent snapshot, to `dest` with SQLite's backup API (safe while the daemon
        writes). `dest` must not exist; the copy is one self-contained file (no write-ahead log beside it) that
        only appears at `dest` once it is complete."""
        dest = Path(dest).expanduser()
        _check_writable_location(dest)
        if dest.exists() or dest.is_symlink():
            raise StoreError(f"{dest}: already exists; a backup never overwrites a file — pass a new path")
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as e:
            raise StoreError(f"{dest}: cannot write the backup ({e.strerror})") from None
        os.close(fd)
        try:
            copy = sqlite3.connect(tmp, isolation_level=None)
            try:
                self._db.backup(copy)
                copy.execute("PRAGMA journal_mode=DELETE")  # one file: the log folded in, and none kept beside it
            finally:
                copy.close()
            _publish(tmp, dest)
        except FileExistsError:
            raise StoreError(f"{dest}: already exists; a backup never overwrites a file — pass a new path") from None
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{dest}: the backup failed ({_one_line(str(e))})") from None
        finally:
            tmp.unlink(missing_ok=True)
        return dest


@contextmanager
def reading(path: str | Path) -> Iterator[Store]:
    """A store opened read-only for the block (Store.open_read_only), then closed. A damaged page met while
    reading is a StoreError that names the file and `l2cluster store check`."""
    store = Store.open_read_only(path)
    try:
        yield store
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{store.path}: cannot read the store ({_one_line(str(e))}); `l2cluster store check --store "
                         f"{store.path}` lists the damage") from None
    finally:
        store.close()


# -- the store file: where it may be, what it must be ---------------------------------------------------------
APPLICATION_ID = 0x4C32434C  # "L2CL": SQLite's header field that says which application a database file belongs to


def _one_line(text: str) -> str:
    """SQLite's messages (an integrity check's rows) as one line."""
    return " ".join(text.split())


def _check_file_path(path: Path) -> None:
    """Refuse, in one line, a path that cannot be a file: a folder, or a path under a file."""
    if path.is_dir():
        raise StoreError(f"{path}: is a folder; pass the store's file path, such as {path / 'store.db'}")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise StoreError(f"{path}: {ancestor} is a file, not a folder; pass a store path inside a folder")


def _check_writable_location(path: Path) -> None:
    """Refuse, in one line, a store path that cannot hold a store file: a folder, a path under a file, a read-only
    folder (SQLite writes its -wal and -shm files beside the store); create missing parent folders."""
    _check_file_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{path}: cannot create the folder {path.parent} ({e.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise StoreError(f"{path}: the folder {path.parent} is read-only (the store writes a log file beside "
                         "itself); reading commands still read it — to write, copy the store to a writable folder")


def _create(path: Path) -> None:
    """A new, empty store at `path`, created whole or not at all: built under a temporary name with owner-only
    permissions, then linked into place. So a file l2cluster left is never empty, and an existing empty file
    is not mistaken for one (Store refuses it). A store another process created meanwhile is kept."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # its -wal/-shm files inherit that
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            for statement in _statements():
                db.execute(statement)
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        finally:
            db.close()
        _publish(tmp, path)
    except FileExistsError:
        pass  # created by another process meanwhile: opened as it is
    except (OSError, sqlite3.Error) as e:
        raise StoreError(f"{path}: cannot create the store ({_one_line(str(e))})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, dest: Path) -> None:
    """Give the finished file `tmp` its name `dest`; FileExistsError if `dest` exists (never overwritten: a hard
    link, not rename(); on a file system without hard links, rename() after a last look)."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise
    except OSError:
        if dest.exists():
            raise FileExistsError(dest) from None
        os.rename(tmp, dest)


def _connect_writer(path: Path, timeout: float) -> sqlite3.Connection:
    """A writing connection with the settings every write of the store relies on (foreign keys, WAL-safe sync)."""
    db = sqlite3.connect(path, isolation_level=None, timeout=timeout)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def _connect_read_only(path: Path, timeout: float) -> sqlite3.Connection:
    """A read-only connection to an existing store. In a read-only folder (a mounted backup), where SQLite cannot
    create the -shm file a WAL reader needs, a store without a pending log is read as immutable: nothing can
    write it there."""
    wal = path.with_name(path.name + "-wal")
    read_only_folder = not os.access(path.parent, os.W_OK)
    uri = f"{path.resolve().as_uri()}?mode=ro" + ("&immutable=1" if read_only_folder and not wal.exists() else "")
    try:
        db = sqlite3.connect(uri, uri=True, timeout=timeout)
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError as e:
        hint = (" — its folder is read-only and its write-ahead log is pending: copy the folder somewhere writable"
                if read_only_folder and wal.exists() else "")
        raise StoreError(f"{path}: cannot read the store ({_one_line(str(e))}){hint}") from None
    db.row_factory = sqlite3.Row
    return db


def _identify(path: Path) -> int:
    """The schema version of the l2cluster store at `path`; StoreError for any other file. A store from before the
    application id (schema ≤ 4) is known by its meta table. Read through a connection of its own that, when no log
    is beside the file, reads the file alone (immutable): another application's file gets no -wal or -shm file
    beside it either."""
    wal = path.with_name(path.name + "-wal")
    uri = f"{path.resolve().as_uri()}?mode=ro" + ("" if wal.exists() else "&immutable=1")
    db = sqlite3.connect(uri, uri=True)
    try:
        return _identified(db, path)
    finally:
        db.close()


def _identified(db: sqlite3.Connection, path: Path) -> int:
    application_id = db.execute("PRAGMA application_id").fetchone()[0]
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    row = None
    if "meta" in tables:
        with suppress(sqlite3.OperationalError):  # another application's table called meta
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = int(row[0]) if row is not None and str(row[0]).isdigit() else None
    if application_id == APPLICATION_ID and version is not None:
        return version
    if application_id == 0 and version is not None and version <= 4:
        return version
    if application_id == APPLICATION_ID:
        what = "an l2cluster store that lost its schema version (damaged)"
    elif application_id != 0:
        what = f"another application's SQLite database (application_id {application_id:#x})"
    elif not tables and path.stat().st_size == 0:
        what = "an empty file (0 bytes)"
    elif not tables:
        what = "an empty SQLite database"
    else:
        what = f"a SQLite database with other tables ({', '.join(sorted(tables)[:4])})"
    raise StoreError(f"{path}: {what}, not an l2cluster store; it was left untouched — l2cluster creates its "
                     "store itself: pass a path that does not exist yet, or move the file aside")


def checkpoint(path: str | Path) -> None:
    """Fold a store's write-ahead log into the file (after a writer stopped without closing it, e.g. a killed
    coordinator): store.db alone then holds everything. Does nothing when there is no log."""
    path = Path(path).expanduser()
    wal = path.with_name(path.name + "-wal")
    if not path.is_file() or not wal.exists():
        return
    db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def _statements() -> list[str]:
    return [s.strip() for s in _SCHEMA.split(";") if s.strip()]


def shape_json(config: dict) -> str:
    """What decides a job's gang (its ranks and their resources), as stored for the scheduler."""
    s = config.get("scaling", {})
    return json.dumps({k: s.get(k) for k in ("num_workers", "cpus_per_worker", "gpus_per_worker", "use_gpu")},
                      sort_keys=True)


def job_dict(row: sqlite3.Row) -> dict:
    """A row of the jobs table as the plain dict the CLI shows (`status`, `results --jobs`)."""
    return {"job": row["id"], "experiment": row["experiment_id"], "label": row["label"],
            "overrides": json.loads(row["overrides_json"]), "seed": row["seed"], "state": row["state"],
            "epoch": row["epoch"], "attempts": row["attempts"], "node": row["node"], "error": row["error"],
            "priority": row["priority"], "submitted_at": row["submitted_at"], "started_at": row["started_at"],
            "finished_at": row["finished_at"],
            "pack": row["pack_id"] if "pack_id" in row.keys() else None,  # noqa: SIM118 (a Row's `in` reads values)
            "plugins": json.loads(row["plugins_json"] or "{}") if "plugins_json" in row.keys() else {}}  # noqa: SIM118


# -- what `status` and `logs` show: read by the coordinator, or straight from a store file by the CLI ------------
def experiment_rows(store: Store) -> list[dict]:
    """Every experiment with its job counts by state."""
    return [{"experiment": e["id"], "priority": e["priority"], "submitted_at": e["submitted_at"],
             "counts": store.counts(e["id"])} for e in store.experiments()]


def experiment_jobs(store: Store, experiment: str) -> list[dict]:
    """An experiment's (id or unique prefix) jobs as `status` shows them, each with its latest note if it has one."""
    experiment_id = store.resolve_experiment(experiment)
    notes = store.notes(experiment_id)
    jobs = [job_dict(r) for r in store.jobs(experiment_id)]
    for job in jobs:
        if job["job"] in notes:
            job["note"] = notes[job["job"]]
    return jobs


def job_log(store: Store, job: str) -> dict:
    """A job (id or unique prefix) with its state changes, per-epoch metrics and result."""
    job_id = store.resolve_job(job)
    events = [{"at": e["at"], "from": e["old_state"], "to": e["new_state"], "attempt": e["attempt"],
               "detail": e["detail"]} for e in store.events(job_id)]
    # type-check: a job the store holds: its row is never None here
    return {"job": job_dict(store.job(job_id)), "events": events, "epochs": store.epochs(job_id),  # type: ignore[arg-type]
            "result": store.result(job_id)}
