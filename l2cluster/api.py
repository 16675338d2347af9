"""The Python API: submit a job spec to the daemon or run it embedded, wait with progress, and read an experiment's
results per configuration, per job and per epoch, as plain records or pandas DataFrames, from the daemon or
straight from a store file.

    from l2cluster import api
    exp = api.run("jobs/quickstart.yaml", store="sweep.db")        # or api.submit(spec) to a running daemon
    exp.results().to_pandas()                                      # one row per configuration, ranked
    api.open_store("sweep.db").experiment("quickstart").epochs()   # later, anywhere: no daemon, no Ray

Importing this module imports neither torch nor Ray; submitting or running a spec loads them (the plugin registry
validates the spec), reading results never does. The CLI's `submit`, `run` and `--wait` use the functions below.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from l2cluster.errors import NotFoundError
from l2cluster.results.aggregate import export_experiment, group_jobs, settings_text
from l2cluster.results.store import Store, job_dict, reading

__all__ = ["Experiment", "Records", "StoreReader", "open_store", "run", "submit"]

# The statistics of a configuration (l2cluster.results.aggregate.Group), each as <name>_mean, _sd, _ci_low, _ci_high.
_STATS = ("val_acc", "val_loss", "best_val_acc", "test_acc", "test_loss", "train_acc", "gap", "weight_norm")


# -- records ------------------------------------------------------------------------------------------------------
class Records(list):
    """Rows as plain dicts (a list: index it, loop over it, json.dumps it); `.to_pandas()` makes a DataFrame."""

    def __init__(self, rows: Sequence[dict] = (), columns: Sequence[str] = ()):
        super().__init__(rows)
        # The columns in order: the first row's keys, then any key a later row adds; `columns` when there are no rows.
        self.columns = list(dict.fromkeys(k for r in rows for k in r)) if rows else list(columns)

    def to_pandas(self):
        """The rows as a pandas DataFrame, one column per key (needs pandas: pip install 'l2cluster[pandas]')."""
        try:
            import pandas
        except ImportError:
            raise ImportError("to_pandas() needs pandas, an optional dependency of l2cluster: "
                              "pip install 'l2cluster[pandas]'") from None
        return pandas.DataFrame.from_records(list(self), columns=self.columns)

    as_dataframe = to_pandas


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def results_records(export: dict, by: Sequence[str] | None = None) -> Records:
    """One record per configuration, as l2cluster.results.aggregate computes it (ranked by mean validation accuracy):
    rank, name, label, settings, one column per grid setting, counts, and <metric>_mean/_sd/_ci_low/_ci_high for
    each statistic (accuracies as fractions, the gap in fraction points: train_acc − test_acc)."""
    rows = []
    for g in group_jobs(export, by):
        row = {"experiment": g.experiment, "rank": g.rank, "name": g.name, "label": g.label, "settings": g.settings,
               **g.overrides, "n": g.num_succeeded, "seeds": g.seeds, "num_jobs": g.num_jobs,
               "num_diverged": g.num_diverged, "num_failed": g.num_failed, "num_cancelled": g.num_cancelled,
               "num_pending": g.num_pending}
        for stat in _STATS:
            s = getattr(g, stat)
            row.update({f"{stat}_mean": s.mean, f"{stat}_sd": s.sd, f"{stat}_ci_low": s.ci_low,
                        f"{stat}_ci_high": s.ci_high})
        row["best_epoch"] = g.best_epoch
        rows.append(row)
    return Records(rows)


def jobs_records(export: dict) -> Records:
    """One record per job: id, label, settings (also one column per grid setting), overrides, seed, state, the
    final metrics the trainer stored (val_acc, test_acc, epochs_run, train_s, …), error, attempts, node, pack."""
    rows = []
    for j in export["jobs"]:
        result = j.get("result") or {}
        row = {"job": j["job"], "experiment": export["experiment"], "label": j["label"],
               "settings": settings_text(j["overrides"]), **j["overrides"],
               "overrides": j["overrides"], "seed": j["seed"], "state": j["state"]}
        row.update({k: v for k, v in (result.get("final") or {}).items() if k not in row})
        row.update(error=j.get("error") or result.get("error"), diverged_epoch=result.get("diverged_epoch"),
                   attempts=j["attempts"], node=j["node"], pack=j.get("pack"))
        rows.append(row)
    return Records(rows)


def epochs_records(export: dict) -> Records:
    """Per-epoch metrics in long form: one record per job × epoch × metric (job, label, settings, one column per
    grid setting, seed, epoch, metric, value); only numeric metrics (train_loss, val_acc, lr, grad_norm, …)."""
    rows = []
    for j in export["jobs"]:
        head = {"job": j["job"], "label": j["label"], "settings": settings_text(j["overrides"]),
                **j["overrides"], "seed": j["seed"]}
        for m in j.get("epochs") or []:
            for metric, value in m.items():
                if metric != "epoch" and _is_number(value):
                    rows.append({**head, "epoch": m["epoch"], "metric": metric, "value": value})
    return Records(rows, columns=("job", "label", "settings", "seed", "epoch", "metric", "value"))


# -- where an experiment lives: the daemon, or a store file ---------------------------------------------------
def call_coordinator(fn: str, *args, timeout: float | None = 60, restart_wait_s: float = 120.0, **kwargs):
    """Call the coordinator actor's method `fn` (on the cluster this process is connected to) and return its
    answer. Raises NotFoundError for an unknown experiment or job, the plugin's PluginError, or what the
    coordinator raised (a SpecError names every bad field); a DaemonError when the coordinator does not answer within
    `timeout` seconds or is gone."""
    import ray

    from l2cluster.cluster.daemon import DaemonError, coordinator

    deadline = time.monotonic() + restart_wait_s
    while True:
        try:
            return ray.get(getattr(coordinator(), fn).remote(*args, **kwargs), timeout=timeout)
        except ray.exceptions.ActorUnavailableError:
            # Ray is restarting the coordinator (its process died). Every coordinator call is safe to repeat
            # (submit is idempotent, the others read or cancel), so ask the new one instead of giving up.
            if time.monotonic() > deadline:
                raise DaemonError(f"the coordinator did not come back within {restart_wait_s:.0f} s; see `l2cluster "
                                  "daemon status`, and start it again with `l2cluster daemon start`") from None
            time.sleep(1.0)
        except ray.exceptions.GetTimeoutError:
            raise DaemonError(f"the coordinator did not answer {fn!r} within {timeout:.0f} s; see `l2cluster daemon "
                              "status` (and the daemon's log)") from None
        except ray.exceptions.RayActorError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DaemonError(f"the coordinator stopped ({reason}); start it again with `l2cluster daemon "
                              "start`") from None
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(e.cause, NotFoundError):  # not a KeyError from a bug: that one keeps its traceback
                raise NotFoundError(*e.cause.args) from None
            # A PluginError (its class is loaded once one arrived: no torch import to check): its message alone.
            plugin_error = getattr(sys.modules.get("l2cluster.plugin"), "PluginError", None)
            if plugin_error is not None and isinstance(e.cause, plugin_error):
                raise e.cause from None
            raise cause from None


class _Daemon:
    """An experiment on the daemon this process reaches (`address`, else RAY_ADDRESS, else the local daemon)."""

    def __init__(self, address: str | None = None):
        self.address = address

    def export(self, experiment_id: str, epochs: bool = True) -> dict:
        from l2cluster.cluster.daemon import connect

        connect(self.address)
        return call_coordinator("export", experiment_id, epochs, timeout=300)

    def status(self, experiment_id: str) -> list[dict]:
        from l2cluster.cluster.daemon import connect

        connect(self.address)
        return call_coordinator("status", experiment_id)

    def __repr__(self) -> str:
        return f"daemon at {self.address}" if self.address else "the daemon"


class _StoreFile:
    """An experiment in a store file, read read-only (beside a daemon that writes it, too)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    @contextlib.contextmanager
    def open(self) -> Iterator[Store]:
        with reading(self.path) as store:
            yield store

    def export(self, experiment_id: str, epochs: bool = True) -> dict:
        with self.open() as store:
            return export_experiment(store, experiment_id, epochs=epochs)

    def status(self, experiment_id: str) -> list[dict]:
        with self.open() as store:
            if store.experiment(experiment_id) is None:
                raise NotFoundError(f"no experiment {experiment_id!r} in {self.path}")
            return [job_dict(r) for r in store.jobs(experiment_id)]

    def __repr__(self) -> str:
        return f"store {self.path}"


def follow(experiment_id: str, status: Callable[[], list[dict]], epochs_of: dict[str, int],
           stream: TextIO | None, names: dict[str, str] | None = None) -> None:
    """Poll `status` (the experiment's jobs) until every job has ended, drawing progress to `stream` (None: quietly):
    redrawn in place on a terminal, a plain line per change elsewhere (a notebook, a log). `names`: job id → its
    configuration's name, for the display."""
    from l2cluster.results.progress import Progress, ProgressDisplay

    progress = Progress(epochs_of, names)
    display = ProgressDisplay(experiment_id, stream) if stream is not None else None
    interval = 1.0 if display is not None and display.tty else 2.0
    while True:
        snap = progress.update(status())
        if display is not None:
            display.show(snap)
        if snap.finished:
            return
        time.sleep(interval)


class Experiment:
    """One submitted experiment: wait for it, and read its results per configuration, per job and per epoch.

    Every read asks where the experiment lives (the daemon, or a store file) again, so the numbers are the
    stored ones at that moment."""

    def __init__(self, experiment_id: str, source, submission: dict | None = None):
        self.id = experiment_id
        self._source = source
        # What submit/run said: jobs, new (queued), reused (results already in the store), rerun.
        self.submission = submission or {}

    @property
    def name(self) -> str:
        return self.id.rsplit("-", 1)[0]  # ids are NAME-xxxxxxxx

    def __repr__(self) -> str:
        return f"<Experiment {self.id} in {self._source!r}>"

    def status(self) -> dict[str, int]:
        """How many jobs are in each state, e.g. {"running": 2, "succeeded": 6}."""
        counts: dict[str, int] = {}
        for j in self._source.status(self.id):
            counts[j["state"]] = counts.get(j["state"], 0) + 1
        return counts

    def wait(self, progress: bool = True, *, stream: TextIO | None = None) -> Experiment:
        """Block until every job has ended, showing progress on `stream` (default stderr) unless `progress` is
        False. Returns the experiment, so `exp.wait().results()` reads."""
        plan = self._source.export(self.id, epochs=False)
        epochs_of = {j["job"]: j["config"]["epochs"] for j in plan["jobs"]}
        follow(self.id, lambda: self._source.status(self.id), epochs_of,
               (stream or sys.stderr) if progress else None)
        return self

    def results(self, by: Sequence[str] | None = None) -> Records:
        """One record per configuration, summarized over seeds and ranked by validation accuracy (see
        `results_records`); `by` groups by other fields instead, as `l2cluster results --by`."""
        from l2cluster.results.aggregate import FieldError

        try:
            return results_records(self._source.export(self.id), by)
        except FieldError as e:
            raise ValueError(str(e).replace("--by ", "by=", 1)) from None

    def jobs(self) -> Records:
        """One record per job with its final metrics (see `jobs_records`)."""
        return jobs_records(self._source.export(self.id, epochs=False))

    def epochs(self) -> Records:
        """Every job's per-epoch metrics in long form (see `epochs_records`)."""
        return epochs_records(self._source.export(self.id))

    def export(self) -> dict:
        """Everything stored about the experiment as one dict (l2cluster.results.aggregate.export_experiment)."""
        return self._source.export(self.id)


# -- reading a store file -----------------------------------------------------------------------------------
class StoreReader:
    """A store file opened for reading: its experiments, by id or by a prefix of it (the name)."""

    def __init__(self, path: str | Path):
        self._file = _StoreFile(path)
        with self._file.open():  # a missing or unreadable file is a StoreError now, not at the first read
            pass

    @property
    def path(self) -> Path:
        return self._file.path

    def __repr__(self) -> str:
        return f"<StoreReader {self.path}>"

    def experiments(self) -> Records:
        """One record per experiment, oldest first: id, name, submitted_at (epoch seconds), priority, num_jobs and
        the number of jobs in each state."""
        rows = []
        with self._file.open() as store:
            for e in store.experiments():
                counts = store.counts(e["id"])
                rows.append({"experiment": e["id"], "name": e["name"], "submitted_at": e["submitted_at"],
                             "priority": e["priority"], "num_jobs": sum(counts.values()), **counts})
        return Records(rows, columns=("experiment", "name", "submitted_at", "priority", "num_jobs"))

    def experiment(self, key: str) -> Experiment:
        """The experiment whose id is `key`, or the one whose id starts with it (a name, or a name and the first
        digits of the id), as `Store.resolve_experiment` finds it; NotFoundError, naming what exists or what
        matched, otherwise."""
        with self._file.open() as store:
            return Experiment(store.resolve_experiment(key), self._file)


def open_store(path: str | Path) -> StoreReader:
    """Open a store file (what `l2cluster run` or the daemon wrote) for reading; no daemon or Ray needed."""
    return StoreReader(path)


# -- submitting and running ---------------------------------------------------------------------------------
def load_plugins(plugin_dirs: Sequence[str | Path] = ()):
    """The plugin registry: built-ins, installed entry points, `plugin_dirs` and L2CLUSTER_PLUGIN_DIRS."""
    from l2cluster.registry import load_registry

    dirs = list(plugin_dirs or [])
    env = os.environ.get("L2CLUSTER_PLUGIN_DIRS")
    if env:
        dirs += [d for d in env.split(os.pathsep) if d]
    return load_registry(dirs)


def spec_data(spec) -> tuple[dict, str]:
    """A spec given as a file path, a dict or a parsed spec model, as the dict the coordinator takes and a name
    for it in errors."""
    from pydantic import BaseModel

    from l2cluster.spec.loading import read_spec_file

    if isinstance(spec, (str, Path)):
        data, source = read_spec_file(spec), str(spec)
    elif isinstance(spec, dict):
        data, source = spec, f"<spec {spec.get('name', '?')}>"
    elif isinstance(spec, BaseModel):
        data, source = spec.model_dump(mode="json"), f"<spec {getattr(spec, 'name', '?')}>"
    else:
        raise TypeError(f"spec: expected a file path, a dict or a parsed spec, got {type(spec).__name__}")
    return data, source


def submit(spec, *, address: str | None = None, priority: int = 0, rerun: bool = False,
           plugin_dirs: Sequence[str | Path] = ()) -> Experiment:
    """Queue a spec's jobs on the running daemon (`address`, else RAY_ADDRESS, else the local daemon) and return
    the experiment at once; `.wait()` follows it. Jobs whose results the store already has are reused unless
    `rerun`. The daemon validates the spec with the plugins it loaded (a SpecError names each bad field)."""
    from l2cluster.cluster.daemon import connect
    from l2cluster.registry import versions

    data, source = spec_data(spec)
    registry = load_plugins(plugin_dirs)
    connect(address)
    # The versions of the plugins this client sees: the daemon refuses a job whose plugin it loaded in another
    # version (the ids, and so the stored results reused, depend on them).
    sub = call_coordinator("submit", data, priority, source, rerun, versions(registry))
    return Experiment(sub["experiment"], _Daemon(address), submission=sub)


def check_store(path: Path) -> None:
    """Open (or create) the store once, so that a corrupt or locked file is a clear error (StoreError) before any
    daemon starts on it; the file is left untouched."""
    Store(path).close()


def start_coordinator(store, **options):
    """daemon.start_coordinator, with the reason in one line (DaemonError) when the coordinator dies while
    starting (a corrupt or locked store on the coordinator's node, an unusable plugin directory…)."""
    import re

    from ray.exceptions import RayActorError

    from l2cluster.cluster import daemon

    try:
        return daemon.start_coordinator(store, **options)
    except RayActorError as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        reason = last.split(": ", 1)[1] if re.match(r"^[\w.]+(Error|Exception): ", last) else last
        raise daemon.DaemonError(f"the coordinator could not start: {reason}") from None


@contextlib.contextmanager
def embedded_coordinator(store: Path, *, num_cpus: int | None = None, say: Callable[[str], None] = lambda _: None,
                         **options) -> Iterator[Any]:
    """A new local Ray on 127.0.0.1 in this process with a coordinator on `store` (yielded), both shut down on
    exit; `say` hears what is starting. Refuses a store that a running local daemon uses (two writers)."""
    import ray

    from l2cluster.cluster import daemon

    state = daemon.read_state()
    if state and daemon._alive(state["pid"]) and Path(state["store"]).resolve() == store:
        raise daemon.DaemonError(f"a local daemon is running on the same store {store}; submit to it instead "
                                 "(`l2cluster submit --wait`, l2cluster.api.submit) or use another store")
    check_store(store)
    say(f"starting a local Ray on 127.0.0.1 ({num_cpus or os.cpu_count()} CPUs) …")
    daemon.start_local_ray(num_cpus)
    try:
        say("starting the coordinator …")
        handle = start_coordinator(store, detached=False, **options)
        yield handle
        ray.get(handle.shutdown.remote(), timeout=30)
    finally:
        ray.shutdown()


def cluster_address(address: str | None = None) -> str | None:
    """The Ray cluster that `run` uses instead of starting its own: `address`, else RAY_ADDRESS (`ray job submit`
    sets it for a job's entrypoint), else "auto" inside a Ray job that has no RAY_ADDRESS; None: run embedded."""
    in_ray_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # what Ray's job supervisor gives a job's entrypoint
    return address or os.environ.get("RAY_ADDRESS") or ("auto" if in_ray_job else None)


@dataclass
class RunCoordinator:
    """The coordinator a `run` submits to, and where it is."""

    handle: Any
    store: Path  # the store file the coordinator writes (on the coordinator's node)
    where: str  # "a local Ray", "the Ray cluster at ADDRESS"
    started: bool  # started for this run and stopped at its end (False: a daemon's, left running)


@contextlib.contextmanager
def cluster_coordinator(address: str, store: Path, *, say: Callable[[str], None] = lambda _: None,
                        **options) -> Iterator[RunCoordinator]:
    """The coordinator on the Ray cluster at `address`: the one running there (a daemon's: used, left running), else
    one started for this run on `store` with `options` and stopped on exit. No nested Ray: inside a Ray job, that is
    the cluster the job runs on. This process disconnects on exit."""
    import ray

    from l2cluster.cluster import daemon

    where = "the Ray cluster this job runs on" if address == "auto" else f"the Ray cluster at {address}"
    say(f"connecting to {where} …")
    daemon.connect(address)
    try:
        try:
            running = daemon.coordinator()
        except daemon.DaemonError:
            running = None
        if running is not None:
            info = call_coordinator("ping")
            say(f"using the coordinator that runs there (store {info['store']})")
            yield RunCoordinator(running, Path(info["store"]), where, started=False)
            return
        say("starting a coordinator there for this run …")
        # Owned by this process (not detached): it goes when the run ends, even when the run is killed.
        handle = start_coordinator(store, detached=False, **options)
        yield RunCoordinator(handle, store, where, started=True)
        ray.get(handle.shutdown.remote(), timeout=30)
    finally:
        ray.shutdown()


@contextlib.contextmanager
def run_coordinator(store: Path, *, address: str | None = None, num_cpus: int | None = None,
                    say: Callable[[str], None] = lambda _: None, **options) -> Iterator[RunCoordinator]:
    """Where `run` trains: the Ray cluster of `cluster_address(address)` (cluster_coordinator), else an embedded
    local Ray with `num_cpus` (embedded_coordinator)."""
    address = cluster_address(address)
    if address:
        with cluster_coordinator(address, store, say=say, **options) as target:
            yield target
        return
    with embedded_coordinator(store, num_cpus=num_cpus, say=say, **options) as handle:
        yield RunCoordinator(handle, store, "a local Ray", started=True)


def run(spec, *, store: str | Path | None = None, num_cpus: int | None = None, data_dir: str | Path | None = None,
        rerun: bool = False, progress: bool = True, priority: int = 0, plugin_dirs: Sequence[str | Path] = (),
        address: str | None = None, **options) -> Experiment:
    """Run a spec as `l2cluster run` does: a coordinator on `store` (default ~/.local/state/l2cluster/store.db),
    every job, then a clean shutdown. Where: a local Ray on 127.0.0.1 with `num_cpus` (default all), embedded in this
    process; or, given `address`, RAY_ADDRESS or inside a Ray job (`ray job submit`), that Ray cluster, whose running
    coordinator is used if it has one (see cluster_coordinator). Shows progress on stderr unless `progress` is
    False. Returns the experiment, read from the store file (from that daemon when it was a daemon's coordinator).

    `options` go to the coordinator: idle_release_s, strategy, checkpoint_dir, max_jobs, max_pack."""
    from l2cluster.cluster import daemon
    from l2cluster.spec.loading import parse_spec

    data, source = spec_data(spec)
    parse_spec(data, load_plugins(plugin_dirs), source=source)  # a bad field is a SpecError before Ray starts
    store = Path(store or daemon.default_store()).expanduser().resolve()
    say = (lambda message: print(message, file=sys.stderr, flush=True)) if progress else (lambda _: None)
    with run_coordinator(store, address=address, num_cpus=num_cpus, plugin_dirs=[str(d) for d in plugin_dirs],
                         data_dir=str(data_dir) if data_dir else None, say=say, **options) as target:
        sub = call_coordinator("submit", data, priority, source, rerun)
        if progress:
            print(f"{sub['experiment']}: {sub['jobs']} job(s), {sub['new']} new, {sub['reused']} reused from the "
                  f"store, {sub['rerun']} rerun", file=sys.stderr)
        Experiment(sub["experiment"], _Daemon(), sub).wait(progress)
    reader = _StoreFile(target.store) if target.started else _Daemon(address)
    return Experiment(sub["experiment"], reader, submission=sub)
