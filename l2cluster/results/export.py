"""Exports: an experiment's per-epoch metrics and final results, out of the store into the files and tools researchers
already use (TensorBoard, MLflow, CSV, Parquet, JSON Lines).

Every writer works on the plain dict of l2cluster.results.aggregate.export_experiment (the one `results` and
`report` use, from the store file or from the coordinator), so the numbers are the stored ones. Importing this
module imports neither torch nor Ray; each writer imports its library (tensorboard, mlflow, pyarrow) when it runs.

The record of one job × epoch (`epoch_records`), the row of every file format:
    experiment, job, label, seed, state, group (the configuration: jobs that differ only by seed share it),
    settings {swept dotted path: value}, epoch, every stored per-epoch metric (train_loss, val_acc, lr, grad_norm,
    clipped_steps, penalty_<plugin>, epoch_s, …) and final {the job's final metrics: test_acc, test_loss, …}.
A job with no stored epoch (queued, or failed before its first) still has one record, with epoch None.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from l2cluster.errors import InputError
from l2cluster.states import JobState

FORMATS = ("tensorboard", "mlflow", "csv", "parquet", "jsonl")
# Per job, the metrics the TensorBoard HParams tab and MLflow compare runs by (those a job has; final/… are the
# job's final metrics, the rest the last epoch's).
SUMMARY_METRICS = ("val_acc", "val_loss", "final/test_acc", "final/test_loss", "train_acc", "train_loss")
_MLFLOW_STATUS = {JobState.SUCCEEDED: "FINISHED", JobState.FAILED: "FAILED", JobState.DIVERGED: "FAILED",
                  JobState.CANCELLED: "KILLED"}


class ExportError(InputError, ValueError):
    """An export cannot be written (bad destination, missing package); the message names what and the fix."""


# -- records ----------------------------------------------------------------------------------------------------
def epoch_records(export: dict) -> list[dict]:
    """One record per job × epoch of an exported experiment, in job order then epoch order (see the module doc)."""
    records = []
    for job in export["jobs"]:
        base = {"experiment": export["experiment"], "job": job["job"], "label": job["label"], "seed": job["seed"],
                "state": job["state"], "group": job.get("group_key"), "settings": dict(job["overrides"])}
        final = dict((job.get("result") or {}).get("final") or {})
        for m in job.get("epochs") or [{"epoch": None}]:
            records.append({**base, "epoch": m.get("epoch"), **{k: v for k, v in m.items() if k != "epoch"},
                            "final": final})
    return records


def flatten(record: dict, prefix: str = "") -> dict:
    """Nested dicts as dotted keys (`settings.optimizer.lr`, `final.test_acc`), as pandas.json_normalize does;
    lists become JSON text, so every value is a scalar."""
    flat = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            flat[key] = json.dumps(v)
        else:
            flat[key] = v
    return flat


def _columns(rows: list[dict]) -> list[str]:
    """Every key of the rows, in order of first appearance, the final.* columns last."""
    seen = dict.fromkeys(k for r in rows for k in r)
    return [k for k in seen if not k.startswith("final.")] + [k for k in seen if k.startswith("final.")]


# -- files ------------------------------------------------------------------------------------------------------
def write_jsonl(export: dict, dest: str | Path) -> Path:
    """One JSON object per line per job × epoch (settings and final nested); non-finite numbers are null."""
    path = _file(dest)
    with _opened(path) as f:
        for r in epoch_records(export):
            f.write(json.dumps(_finite(r), allow_nan=False) + "\n")
    return path


def write_csv(export: dict, dest: str | Path) -> Path:
    """Wide form: one row per job × epoch, one column per metric (settings.* and final.* flattened)."""
    path = _file(dest)
    rows = [flatten(r) for r in epoch_records(export)]
    with _opened(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(export: dict, dest: str | Path) -> Path:
    """The CSV's table as Parquet (pyarrow), with typed columns; a column mixing text and numbers is text."""
    pa, pq = _need("pyarrow", "parquet", lambda: (__import__("pyarrow"), __import__("pyarrow.parquet").parquet))
    path = _file(dest)
    rows = [flatten(r) for r in epoch_records(export)]
    columns = {}
    for name in _columns(rows):
        values = [r.get(name) for r in rows]
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:  # e.g. a swept setting that is a number here, a list there
            values = [None if v is None else str(v) for v in values]
        elif kinds == {int, float}:
            values = [None if v is None else float(v) for v in values]
        columns[name] = values
    try:
        pq.write_table(pa.table(columns), path)
    except OSError as e:
        raise ExportError(f"{path}: cannot write ({e}); pass a writable -o path") from None
    return path


# -- TensorBoard ------------------------------------------------------------------------------------------------
def write_tensorboard(export: dict, dest: str | Path) -> Path:
    """One run (a subfolder named by `run_name`) per job: every per-epoch metric as a scalar with step = epoch,
    each final metric as `final/<name>` at the last epoch, and the HParams plugin's session (the job's swept
    settings, seed and label; grouped by configuration) so the sweep shows in the HParams tab. The experiment's
    hparams and metrics are declared in an event file at the top of `dest`. `dest` must be empty or new."""
    with TensorBoardExport(dest, export) as tb:
        tb.update(export)
    return tb.root


class TensorBoardExport:
    """`write_tensorboard`, incrementally: `update` with a newer export of the same experiment appends only what is
    new (epochs after those written, a job's end), so `export --follow` can write a sweep's runs as it trains."""

    def __init__(self, dest: str | Path, export: dict, *, metrics: tuple[str, ...] | None = None):
        """`export`: the experiment's jobs, for the hparams declared up front; `metrics`: the HParams metrics to
        declare (default: those of SUMMARY_METRICS the export has; while following, all of them)."""
        self.pb = _need("tensorboard", "tensorboard", _tensorboard_protos)
        self.root = _empty_folder(dest)
        self.written: dict[str, int] = {}  # job → last epoch written
        self.ended: set[str] = set()
        self.writers: dict[str, Any] = {}
        pb = self.pb
        if metrics is None:
            present = {tag for job in export["jobs"] for part in _scalars(job, 0.0) for tag, *_ in part}
            metrics = tuple(m for m in SUMMARY_METRICS if m in present)
        hparams = [_hparams(job) for job in export["jobs"]]
        self._write(self.root, [_hparams_summary(pb, "experiment", pb.api.Experiment(
            description=f"l2cluster experiment {export['experiment']}", time_created_secs=export["submitted_at"],
            hparam_infos=_hparam_infos(pb, hparams),
            metric_infos=[pb.api.MetricInfo(name=pb.api.MetricName(tag=m)) for m in metrics]), export["submitted_at"])])

    def update(self, export: dict) -> None:
        pb = self.pb
        for job in export["jobs"]:
            jid, start = job["job"], job.get("started_at") or export["submitted_at"]
            summaries = []
            if jid not in self.written:
                session = pb.plugin_data.SessionStartInfo(group_name=job.get("group_key") or "", start_time_secs=start)
                for name, value in _hparams(job).items():
                    _set_hparam(session.hparams[name], value)
                summaries.append(_hparams_summary(pb, "session_start_info", session, start))
                self.written[jid] = 0
            per_epoch, final = _scalars(job, start)
            summaries += [_scalar_summary(pb, *x) for x in per_epoch if x[1] > self.written[jid]]
            self.written[jid] = max([self.written[jid]] + [step for _, step, _, _ in per_epoch])
            if JobState(job["state"]).is_terminal and jid not in self.ended:
                summaries += [_scalar_summary(pb, *x) for x in final]
                status = pb.api.STATUS_SUCCESS if job["state"] == JobState.SUCCEEDED else pb.api.STATUS_FAILURE
                end = job.get("finished_at") or start
                summaries.append(_hparams_summary(pb, "session_end_info", pb.plugin_data.SessionEndInfo(
                    status=status, end_time_secs=end), end))
                self.ended.add(jid)
            if summaries:
                self._write(self.root / run_name(job), summaries, keep=jid)

    def _write(self, folder: Path, summaries: list[tuple[int, float, Any]], keep: str | None = None) -> None:
        writer = self.writers.get(keep) if keep else None
        if writer is None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                writer = self.pb.EventFileWriter(str(folder))
            except OSError as e:
                raise ExportError(f"{folder}: cannot write ({e}); pass a writable -o folder") from None
        for step, wall_time, summary in summaries:
            writer.add_event(self.pb.event.Event(wall_time=wall_time, step=step, summary=summary))
        if keep:
            self.writers[keep] = writer
            writer.flush()
        else:
            writer.close()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()

    def __enter__(self) -> TensorBoardExport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_name(job: dict) -> str:
    """A job's run name in TensorBoard and MLflow: label, settings, seed and the job id's first 8 digits, e.g.
    `l2-strength=0.01-seed0-3fa2b1c4` (characters other than letters, digits and `._=+-` become `_`)."""
    parts = [job["label"] or "base"]
    parts += [f"{path.split('.')[-1]}={_text(v)}" for path, v in job["overrides"].items()]
    parts += [f"seed{job['seed']}", job["job"][:8]]
    return re.sub(r"[^\w.=+-]", "_", "-".join(parts))


Scalar = tuple[str, int, float, float]  # tag, step, value, wall time


def _scalars(job: dict, start: float) -> tuple[list[Scalar], list[Scalar]]:
    """(tag, step, value, wall time) of a job's per-epoch metrics, and of its final metrics (`final/<name>`, at its
    last epoch). An epoch's wall time is `start` plus the stored epoch_s of the epochs up to it (time training)."""
    per_epoch, wall, last = [], start, 0
    for m in job.get("epochs") or []:
        wall += m.get("epoch_s") or 0.0
        last = m["epoch"]
        per_epoch += [(k, last, float(v), wall) for k, v in m.items() if k != "epoch" and _is_number(v)]
    final = (job.get("result") or {}).get("final") or {}
    return per_epoch, [(f"final/{k}", last, float(v), wall) for k, v in final.items() if _is_number(v)]


def _scalar_summary(pb, tag: str, step: int, value: float, wall_time: float) -> tuple[int, float, Any]:
    return step, wall_time, pb.summary.Summary(value=[pb.summary.Summary.Value(tag=tag, simple_value=value)])


def _hparams(job: dict) -> dict:
    """The job's hyperparameters for the HParams tab: its swept settings, seed and label."""
    values = {path: v if isinstance(v, (bool, int, float, str)) else _text(v) for path, v in job["overrides"].items()}
    return {**values, "seed": job["seed"], "label": job["label"] or "base"}


def _hparam_infos(pb, all_hparams) -> list:
    """One HParamInfo per hyperparameter name, typed by its values (numbers, booleans or text)."""
    values: dict[str, list] = {}
    for hp in all_hparams:
        for name, v in hp.items():
            values.setdefault(name, []).append(v)
    infos = []
    for name, vs in values.items():
        if all(isinstance(v, bool) for v in vs):
            kind = pb.api.DATA_TYPE_BOOL
        elif all(_is_number(v) for v in vs):
            kind = pb.api.DATA_TYPE_FLOAT64
        else:
            kind = pb.api.DATA_TYPE_STRING
        info = pb.api.HParamInfo(name=name, type=kind)
        if kind == pb.api.DATA_TYPE_STRING:
            info.domain_discrete.extend(sorted({str(v) for v in vs}))
        infos.append(info)
    return infos


def _set_hparam(value, v) -> None:
    if isinstance(v, bool):
        value.bool_value = v
    elif _is_number(v):
        value.number_value = float(v)
    else:
        value.string_value = str(v)


def _tensorboard_protos():
    """The TensorBoard modules the writer needs (none of them imports TensorFlow or torch)."""
    from types import SimpleNamespace

    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    return SimpleNamespace(event=event_pb2, summary=summary_pb2, api=api_pb2, metadata=metadata,
                           plugin_data=plugin_data_pb2, EventFileWriter=EventFileWriter)


def _hparams_summary(pb, kind: str, message, wall_time: float) -> tuple[int, float, Any]:
    """(step 0, wall time, a Summary holding one HParams plugin message), as tensorboard.plugins.hparams.summary
    writes it (that module needs TensorFlow; this is its `_summary` with TensorBoard's own protos)."""
    data = pb.plugin_data.HParamsPluginData(**{kind: message})
    tag = {"experiment": pb.metadata.EXPERIMENT_TAG, "session_start_info": pb.metadata.SESSION_START_INFO_TAG,
           "session_end_info": pb.metadata.SESSION_END_INFO_TAG}[kind]
    value = pb.summary.Summary.Value(tag=tag, metadata=pb.metadata.create_summary_metadata(data),
                                     tensor=pb.metadata.NULL_TENSOR)
    return 0, wall_time, pb.summary.Summary(value=[value])


# -- MLflow -----------------------------------------------------------------------------------------------------
def mlflow_uri(dest: str | Path) -> str:
    """The tracking URI for -o: a URI (`sqlite:///…`, `file:…`, `http://…`) as given; a folder becomes
    `sqlite:///FOLDER/mlflow.db` (MLflow's own file store is in maintenance mode and refuses new use unless
    MLFLOW_ALLOW_FILE_STORE=true)."""
    text = str(dest)
    if re.match(r"^[a-z][a-z0-9+.-]*:", text) and not re.match(r"^[A-Za-z]:[\\/]", text):
        return text
    folder = Path(text).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"{folder}: cannot create the folder ({e}); pass a writable -o folder or a tracking "
                          "URI such as sqlite:///PATH/mlflow.db") from None
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


def config_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A resolved config as MLflow params: dotted keys, with list entries that have a name (the regularizers) by
    that name as in sweep grids (`regularizers.l2.strength`), other lists as JSON; every value as text."""
    params = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        names = [x.get("name") for x in v if isinstance(x, dict)] if isinstance(v, list) else []
        if isinstance(v, dict):
            params.update(config_params(v, key + "."))
        elif names and len(names) == len(v) and None not in names and len(set(names)) == len(names):
            for name, entry in zip(names, v):
                params.update(config_params({n: x for n, x in entry.items() if n != "name"}, f"{key}.{name}."))
            params[key] = json.dumps(names)  # which regularizers, in order
        else:
            params[key] = _text(v)
    return params


def write_mlflow(export: dict, dest: str | Path) -> str:
    """One MLflow run per experiment (named by its id, in the MLflow experiment named like the spec) and one
    nested run per job (tag mlflow.parentRunId): params = the job's resolved config (`config_params`),
    every per-epoch metric with step = epoch, the final metrics as `final/<name>`, tags l2cluster.job, .state,
    .label, .seed, .group. Refuses to export an experiment twice into one tracking store. Returns the URI."""
    mlflow = _need("mlflow", "mlflow", lambda: __import__("mlflow"))
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = mlflow_uri(dest)
    try:
        client = MlflowClient(tracking_uri=uri)
        name = export.get("name") or export["experiment"]
        found = client.get_experiment_by_name(name)
        exp_id = found.experiment_id if found else client.create_experiment(name)
    except mlflow.exceptions.MlflowException as e:
        reason = e.message.strip().splitlines()[0]
        raise ExportError(f"{uri}: MLflow cannot use this tracking store: {reason}") from None
    done = client.search_runs([exp_id], f"tags.`l2cluster.experiment` = '{export['experiment']}' "
                                        "AND tags.`l2cluster.kind` = 'experiment'")
    if done:
        raise ExportError(f"{export['experiment']} is already in {uri} (run {done[0].info.run_id}); delete that run "
                          "in MLflow or export to another tracking URI")

    def ms(t):
        return int((t or export["submitted_at"]) * 1000)

    parent = client.create_run(exp_id, start_time=ms(export["submitted_at"]), run_name=export["experiment"],
                               tags={"l2cluster.experiment": export["experiment"], "l2cluster.kind": "experiment"})
    pid = parent.info.run_id
    for job in export["jobs"]:
        run = client.create_run(exp_id, start_time=ms(job.get("started_at")), run_name=run_name(job), tags={
            "mlflow.parentRunId": pid, "l2cluster.experiment": export["experiment"], "l2cluster.kind": "job",
            "l2cluster.job": job["job"], "l2cluster.state": job["state"], "l2cluster.label": job["label"] or "",
            "l2cluster.seed": str(job["seed"]), "l2cluster.group": job.get("group_key") or ""})
        rid = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in config_params(job.get("config") or {}).items()]
        per_epoch, final = _scalars(job, job.get("started_at") or export["submitted_at"])
        metrics = [Metric(tag, value, ms(wall), step) for tag, step, value, wall in per_epoch + final]
        for i in range(0, len(params), 100):  # MLflow's log_batch limits: 100 params, 1000 metrics per call
            client.log_batch(rid, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[i:i + 1000])
        if JobState(job["state"]).is_terminal:
            client.set_terminated(rid, _MLFLOW_STATUS[JobState(job["state"])], end_time=ms(job.get("finished_at")))
    if all(JobState(job["state"]).is_terminal for job in export["jobs"]):
        client.set_terminated(pid, "FINISHED", end_time=ms(max(
            (j.get("finished_at") or 0 for j in export["jobs"]), default=0) or None))
    return uri


# -- entry point ------------------------------------------------------------------------------------------------
WRITERS = {"tensorboard": write_tensorboard, "mlflow": write_mlflow, "csv": write_csv, "parquet": write_parquet,
           "jsonl": write_jsonl}


def export_to(export: dict, fmt: str, dest: str | Path):
    """Write an exported experiment in one of FORMATS to `dest` (a file for csv/parquet/jsonl, a folder for
    tensorboard, a folder or tracking URI for mlflow); returns where it went."""
    if fmt not in WRITERS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    return WRITERS[fmt](export, dest)


# -- helpers ----------------------------------------------------------------------------------------------------
def _need(module: str, extra: str, load):
    try:
        return load()
    except ImportError:
        raise ExportError(f"this export needs the {module} package: pip install 'l2cluster[{extra}]'") from None


def _file(dest: str | Path) -> Path:
    path = Path(dest).expanduser()
    if path.is_dir():
        raise ExportError(f"{path} is a folder; pass a file path to -o, such as {path / 'epochs'}.<format>")
    return path


@contextmanager
def _opened(path: Path, **kwargs) -> Iterator[TextIO]:
    """open(path, "w"), with an OSError (missing folder, no permission) as an ExportError naming the path."""
    try:
        f = open(path, "w", encoding="utf-8", **kwargs)  # noqa: SIM115 (closed below)
    except OSError as e:
        raise ExportError(f"{path}: cannot write ({e.strerror}); pass a writable -o path") from None
    with f:
        yield f


def _empty_folder(dest: str | Path) -> Path:
    root = Path(dest).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ExportError(f"{root}: not an empty folder; TensorBoard would mix these runs with what is there — "
                          "pass a new or empty folder to -o")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"{root}: cannot create the folder ({e.strerror}); pass a writable -o folder") from None
    return root


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _text(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _finite(v):
    """v with every non-finite float (a diverged job's loss) as None, for strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v

