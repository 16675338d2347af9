"""The `l2cluster` command line: validate and inspect specs and plugins, and train a spec's jobs in this process.

User errors (a bad spec, a missing plugin, unreadable data) print the field and the fix — never a traceback —
and exit with code 2. Results go to stdout, logs to stderr. Exit codes: 0 ok, 1 a job failed (`store check`: the
store is damaged), 2 bad input (or no daemon), 130 interrupted. Commands that only read results import neither
torch nor (with --store) Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from l2cluster.errors import EXIT_INTERRUPTED, InputError, exit_code
from l2cluster.states import JobState, Outcome


class UserError(InputError):
    """An error caused by the input, printed as its message with exit code 2."""


def _registry(args):
    from l2cluster.api import load_plugins

    return load_plugins(args.plugin_dir)


def _load(args, registry):
    from l2cluster.spec.loading import load_spec
    from l2cluster.spec.sweep import expand

    spec = load_spec(args.spec, registry)
    jobs = expand(spec, registry, max_jobs=args.max_jobs)
    return spec, jobs


# -- commands -----------------------------------------------------------------------------------------------
def cmd_validate(args) -> int:
    registry = _registry(args)
    spec, jobs = _load(args, registry)
    variants = sorted({j.label for j in jobs if j.label})
    seeds = spec.sweep.seeds or [spec.seed]
    print(f"ok: {spec.name}: {len(jobs)} job(s)" + (f", variants {', '.join(variants)}" if variants else "")
          + f", seeds {seeds}")
    return 0


def cmd_schema(args) -> int:
    from l2cluster.spec.config import spec_models

    schema = spec_models(_registry(args)).experiment.model_json_schema()
    print(json.dumps(schema, indent=2))
    return 0


def cmd_plugins_list(args) -> int:
    registry = _registry(args)
    rows = []
    for p in registry.all():
        status = p.status if p.status == "ok" else f"{p.status}: {p.reason}"
        rows.append((p.name, p.origin, ",".join(p.hooks) or "-", status))
    print(_table(("name", "origin", "hooks", "status"), rows))
    return 0


def cmd_plugins_show(args) -> int:
    registry = _registry(args)
    info = registry.get(args.name)
    fields = [{"field": fname, "type": _type_name(f.annotation),
               "default": None if f.is_required() else f.default, "required": f.is_required(),
               "doc": f.description or ""}
              for fname, f in info.config_model.model_fields.items() if fname != "name"]
    if args.format != "table":
        record = {"name": info.name, "origin": info.origin, "version": info.version, "hooks": list(info.hooks),
                  "doc": (info.cls.__doc__ or "").strip(), "fields": fields,
                  "schema": info.config_model.model_json_schema()}
        _print_rows(args.format, ("field", "type", "default", "required", "doc"),
                    [[f["field"], f["type"], f["default"], f["required"], f["doc"]] for f in fields], record)
        return 0
    print(f"{info.name}  ({info.origin})")
    doc = (info.cls.__doc__ or "").strip()
    if doc:
        print("\n".join("  " + line.strip() for line in doc.splitlines()))
    print(f"hooks: {', '.join(info.hooks)}")
    print("config:")
    for fname, f in info.config_model.model_fields.items():
        if fname == "name":
            continue
        default = "required" if f.is_required() else f"default {f.default!r}"
        print(f"  {fname}: {_type_name(f.annotation)} ({default})")
        if f.description:
            print(f"      {f.description}")
    if args.json:
        print(json.dumps(info.config_model.model_json_schema(), indent=2))
    return 0


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def cmd_train(args) -> int:
    import torch

    from l2cluster.ids import pack_id
    from l2cluster.log import configure_logging, get_logger
    from l2cluster.packing import group_into_packs, max_members, pack_key
    from l2cluster.records import JobResult
    from l2cluster.training.data import load_mnist, split_mnist
    from l2cluster.training.process import prepare_training_process
    from l2cluster.training.runner import Member, run_pack
    from l2cluster.training.trainer import resolve_device

    configure_logging()
    prepare_training_process()
    registry = _registry(args)
    spec, jobs = _load(args, registry)
    if args.limit:
        jobs = jobs[: args.limit]
    mnist = load_mnist(args.data_dir, download=not args.no_download)
    splits_cache: dict[tuple, object] = {}
    log = get_logger(experiment=spec.name)
    configs = {job.id: job.config.model_dump(mode="json") for job in jobs}

    def device_of(job):
        return resolve_device(job.config.scaling.use_gpu) if args.device == "auto" else torch.device(args.device)

    def limit_of(job) -> int:
        device = device_of(job)
        gpu_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        return max_members(configs[job.id], gpu_bytes=gpu_bytes, cap=args.max_pack)

    # The daemon's packing rule, so that `train` trains the same packs a gang would.
    limit = min((limit_of(j) for j in jobs), default=1)
    packs = group_into_packs(jobs, limit, lambda j: pack_key(configs[j.id]))
    log.info("experiment_started", jobs=len(jobs), packs=len(packs), torch_threads=torch.get_num_threads())
    rows, t0 = {}, time.perf_counter()
    for n, pack in enumerate(packs, 1):
        d = pack[0].config.data
        key = (d.val_size, d.split_seed, d.train_size)
        if key not in splits_cache:
            splits_cache[key] = split_mnist(mnist, val_size=d.val_size, seed=d.split_seed, train_size=d.train_size)
        pid = pack_id([j.id for j in pack])
        plog = log.bind(pack=pid[:8], members=len(pack), n=f"{n}/{len(packs)}")
        by_id = {j.id: j for j in pack}

        def on_epoch(job_id, epoch, m, plog=plog):
            plog.info("epoch_done", job_id=job_id, epoch=epoch, **{k: _round(v) for k, v in m.items() if k != "epoch"})

        def on_result(job_id, result: JobResult, plog=plog):
            event = plog.info if result.outcome is Outcome.SUCCEEDED else plog.warning
            event("job_finished", job_id=job_id, outcome=result.outcome.value, error=result.error,
                  **{k: _round(v) for k, v in result.final.items()})

        try:
            device = device_of(pack[0])
            plog.info("pack_started", jobs=[j.id for j in pack], device=str(device))
            run = run_pack([Member(j.id, j.config) for j in pack], splits_cache[key], registry, device=device,
                           on_epoch=on_epoch, log=plog)
            results = run.results
        except Exception as e:  # one crashing pack must not take the others down
            plog.error("pack_failed", error=f"{type(e).__name__}: {e}")
            results = {j.id: JobResult.failed(f"{type(e).__name__}: {e}") for j in pack}
        for job_id, result in results.items():
            on_result(job_id, result)
            rows[job_id] = (*_row(by_id[job_id], result.outcome, result.final),
                            pid[:8] if len(pack) > 1 else "-", _error_cell(result.error))
    log.info("experiment_finished", jobs=len(jobs), wall_s=round(time.perf_counter() - t0, 2))
    ordered = [rows[j.id] for j in jobs if j.id in rows]
    print(_table(("job", "variant", "settings", "seed", "outcome", "val_acc", "test_acc", "epochs", "train_s", "pack",
                  "error"), ordered))
    return 0 if all(r[4] != Outcome.FAILED.value for r in ordered) else 1


# -- the daemon ---------------------------------------------------------------------------------------------
def _daemon_call(fn, *args, **kwargs):
    """l2cluster.api.call_coordinator (an unknown experiment or job is a NotFoundError: one line, exit 2)."""
    from l2cluster.api import call_coordinator

    return call_coordinator(fn, *args, **kwargs)


def cmd_daemon(args) -> int:
    from l2cluster.api import check_store, start_coordinator
    from l2cluster.cluster import daemon

    if args.action == "start":
        address = args.address or os.environ.get("RAY_ADDRESS")
        if address:
            daemon.connect(address)
            start_coordinator(args.store or daemon.default_store(), plugin_dirs=args.plugin_dir or [],
                               data_dir=args.data_dir, idle_release_s=args.idle_release_s,
                               strategy=args.placement_strategy, checkpoint_dir=args.checkpoint_dir,
                               max_jobs=args.max_jobs, max_pack=args.max_pack)
            print(f"coordinator running on the cluster at {address}")
            return 0
        store = Path(args.store or daemon.default_store()).resolve()
        if not ((state := daemon.read_state()) and daemon._alive(state["pid"])):
            check_store(store)  # here, before a daemon process fails on it out of sight
        state = daemon.spawn_local_daemon(store, plugin_dirs=args.plugin_dir or [], data_dir=args.data_dir,
                                          idle_release_s=args.idle_release_s, num_cpus=args.num_cpus,
                                          strategy=args.placement_strategy, checkpoint_dir=args.checkpoint_dir,
                                          max_jobs=args.max_jobs, max_pack=args.max_pack)
        print(f"local daemon running: pid {state['pid']}, Ray at {state['address']}, store {state['store']}")
        return 0
    if args.action == "stop":
        if args.address or os.environ.get("RAY_ADDRESS"):
            import ray

            daemon.connect(args.address)
            ray.kill(daemon.coordinator())
            print("coordinator stopped")
            return 0
        state = daemon.read_state()
        if daemon.stop_local_daemon():
            print("local daemon stopped")
        elif state:  # it died without `daemon stop`: stop_local_daemon cleaned up after it
            print(f"the local daemon (pid {state['pid']}) had already stopped without `l2cluster daemon stop`; "
                  f"cleaned up what it left (see {daemon.home() / 'daemon.log'})")
        else:
            print("no local daemon was running")
        return 0
    daemon.connect(args.address)
    info = _daemon_call("ping")
    print(f"coordinator up: store {info['store']}, {info['gangs']} gang(s), {info['running']} job(s) running")
    return 0


def cmd_submit(args) -> int:
    from l2cluster.api import submit

    sub = submit(args.spec, address=args.address, priority=args.priority, rerun=args.rerun,
                 plugin_dirs=args.plugin_dir or []).submission
    print(sub["experiment"])
    print(f"{sub['jobs']} job(s), {sub['new']} new", file=sys.stderr)
    _say_reused(sub)
    if not args.wait:
        return 0
    return _wait_and_report(sub["experiment"])


def cmd_watch(args) -> int:
    """Re-attach to an experiment on the daemon: its live progress until every job has finished, then the tables;
    exit code as `submit --wait` (1 if a job failed)."""
    from l2cluster.cluster.daemon import connect

    connect(args.address)
    return _wait_and_report(args.experiment)  # an unknown experiment: an error naming the recent ones


def _say_reused(sub: dict) -> None:
    """Say on stderr which jobs of a submission were not trained by it: results reused from the store, or
    (--rerun) ended jobs queued again."""
    if sub.get("reused"):
        print(f"{sub['reused']} of {sub['jobs']} jobs reused from the store (stored results shown; --rerun trains "
              "them again)", file=sys.stderr)
    if sub.get("rerun"):
        print(f"{sub['rerun']} of {sub['jobs']} jobs queued again (--rerun): their stored results were deleted",
              file=sys.stderr)


def _wait_and_report(experiment: str) -> int:
    """Show live progress on stderr until every job of the experiment is finished; then print the per-job results
    and the configurations ranked by validation accuracy, fitted to the terminal's width. 1 if a job failed."""
    from l2cluster.api import follow

    plan = _daemon_call("export", experiment, False, timeout=300)
    experiment = plan["experiment"]  # the full id (a unique prefix was given)
    follow(experiment, lambda: _daemon_call("status", experiment),
           {j["job"]: j["config"]["epochs"] for j in plan["jobs"]}, sys.stderr,
           names={j["job"]: _configuration(j) for j in plan["jobs"]})
    export = _daemon_call("export", experiment, timeout=300)
    print(_final_tables(export, _output_width()))
    return 1 if any(j["state"] == JobState.FAILED for j in export["jobs"]) else 0


def _output_width() -> int | None:
    """The width tables on stdout must fit: the terminal's (COLUMNS overrides it); None when stdout is a file or a
    pipe, which gets every column."""
    if os.environ.get("COLUMNS") or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def _final_tables(export: dict, width: int | None) -> str:
    """The per-job table and the ranked configurations, each at most `width` columns (None: no limit): the least
    needed columns are left out first (said under the table), then long names and errors are cut."""
    from l2cluster.results.aggregate import group_jobs
    from l2cluster.results.progress import fit_columns
    from l2cluster.results.report import summary_rows, text_table

    jobs = _results_table(export["jobs"], width)
    header, rows = summary_rows(group_jobs(export))
    dropped: list[str] = []
    if width is not None:
        header, rows, dropped = fit_columns(
            header, rows, width, drop=("weight norm", "test loss ± 95% CI", "best val acc % (epoch)", "test acc sd",
                                       "gap pp ± 95% CI"), cut=(("configuration", 16),))
    ranked = text_table(header, rows)
    if dropped and width is not None:  # only a width drops columns
        ranked += "\n" + textwrap.fill(f"(left out to fit {width} columns: {', '.join(dropped)}; `l2cluster results "
                                       f"{export['experiment']}` shows them)", width)
    return jobs + "\n\n" + ranked


def _results_table(rows: list[dict], width: int | None = None) -> str:
    """One row per job, named as in the ranked table, accuracies in % like it; with `width`, fitted to that many
    columns (node and epochs left out first, then 8-digit job ids, then errors and names cut)."""
    from l2cluster.results.progress import fit_columns

    out = []
    for r in rows:
        final = (r.get("result") or {}).get("final") or {}
        name = _configuration(r)
        error = r.get("error") or (r.get("result") or {}).get("error")
        out.append([r["job"], name, str(r["seed"]), r["state"], _pct(final.get("val_acc")),
                    _pct(final.get("test_acc")), _fmt(final.get("epochs_run")), r["node"] or "-", _error_cell(error)])
    header = ["job", "configuration", "seed", "outcome", "val acc %", "test acc %", "epochs", "node", "error"]
    if width is None:
        return _table(header, out)
    header, out, dropped = fit_columns(header, out, width, drop=("node", "epochs"))
    if len(_table(header, out).splitlines()[1]) > width:  # job ids as the progress display shows them: 8 digits
        for cells in out:
            cells[0] = cells[0][:8]
    header, out, _ = fit_columns(header, out, width, cut=(("error", 12), ("configuration", 16)))
    note = textwrap.fill(f"(left out to fit {width} columns: {', '.join(dropped)})", width) if dropped else ""
    return _table(header, out) + ("\n" + note if note else "")


def _configuration(job: dict) -> str:
    """A job's configuration named as the ranked table names its group (aggregate.Group.name)."""
    from l2cluster.results.aggregate import settings_text, strength_axis

    settings = settings_text(job["overrides"])
    if job["label"] and settings != "-":
        return f"{job['label']} {settings}"
    return job["label"] or (settings if settings != "-" else
                            strength_axis(job["label"], job["overrides"], job.get("config") or {}).series)


def _pct(v) -> str:
    """An accuracy in percent with 2 decimals, the unit of every table (`results` too)."""
    return "-" if v is None else f"{100 * v:.2f}"


def _error_cell(error: str | None, width: int = 60) -> str:
    """A job's error in a table cell: its first line, cut to `width` characters ("-" when there is none);
    `l2cluster logs JOB` shows all of it."""
    if not error or not error.strip():
        return "-"
    line = error.strip().splitlines()[0]
    return line if len(line) <= width else line[: width - 1] + "…"


def cmd_status(args) -> int:
    from l2cluster.results.store import experiment_jobs, experiment_rows

    if args.experiment is None:
        experiments = _read(args, experiment_rows, lambda: _daemon_call("status"))
        rows = [(e["experiment"], e["priority"], time.strftime("%Y-%m-%d %H:%M", time.localtime(e["submitted_at"])),
                 " ".join(f"{k}={v}" for k, v in sorted(e["counts"].items()))) for e in experiments]
        _print_rows(args.format, ("experiment", "priority", "submitted", "jobs"), rows, experiments)
        return 0
    jobs = _read(args, lambda store: experiment_jobs(store, args.experiment),
                 lambda: _daemon_call("status", args.experiment))
    job_rows = [(j["job"], j["label"] or "-", j["seed"], j["state"], j["epoch"], j["attempts"], _pack_cell(j),
                 j["node"] or "-") for j in jobs]
    _print_rows(args.format, ("job", "variant", "seed", "state", "epoch", "attempts", "pack", "node"), job_rows, jobs)
    if args.format == "table":  # whole, under the table: a note names a file and an OS error
        for j in jobs:
            if j.get("note"):
                print(f"note: job {j['job'][:8]}: {j['note']}")
    return 0


def _read(args, from_store, from_daemon):
    """What a read-only command shows: `from_store(store)` on the store file given with --store (no daemon, no
    Ray), else `from_daemon()`, asking the daemon's coordinator (works on any cluster)."""
    if getattr(args, "store", None):
        from l2cluster.results.store import reading

        with reading(args.store) as store:
            return from_store(store)
    from l2cluster.cluster.daemon import DaemonError, connect

    try:
        connect(args.address)
    except DaemonError as e:
        raise UserError(f"{e}; or read a store file directly with --store PATH") from None
    return from_daemon()


def _print_rows(fmt: str, header: Sequence[str], rows: Sequence[Sequence], records: list[dict] | dict) -> None:
    """A command's rows as an aligned table, CSV (the table's columns) or JSON (the full records)."""
    if fmt == "json":
        print(json.dumps(records, indent=2, default=str))
    elif fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    else:
        print(_table(header, rows))


def _pack_cell(job: dict) -> str:
    """The pack a job ran (or runs) in: its id's first 8 digits, "-" for a job trained alone."""
    pack = job.get("pack")
    return pack[:8] if pack and pack != job["job"] else "-"


def cmd_gangs(args) -> int:
    from l2cluster.cluster.daemon import connect

    connect(args.address)
    gangs = _daemon_call("gangs_info")
    if args.job:
        gangs = [g for g in gangs if any(j.startswith(args.job) for j in g["jobs"])]
        if not gangs:
            raise UserError(f"no gang runs a job {args.job!r} now; `l2cluster status EXPERIMENT` shows where jobs "
                            "are (queued, placing, ended)")
    rows = [(g["gang"], "busy" if g["busy"] else "idle", " ".join(j[:8] for j in g["jobs"]) or "-", r["rank"],
             r["pid"], r["node"], r["jobs_run"]) for g in gangs for r in g["ranks"]]
    _print_rows(args.format, ("gang", "state", "jobs", "rank", "pid", "node", "packs_run"), rows, gangs)
    return 0


def cmd_cancel(args) -> int:
    from l2cluster.cluster.daemon import connect

    connect(args.address)
    n = _daemon_call("cancel", args.target)
    print(f"cancelled {n} job(s)")
    return 0


def _exports(args, experiments: Sequence[str]) -> list[dict]:
    """The experiments' jobs with results and epochs: from the coordinator, or read straight from a store file with
    --store (no daemon needed, e.g. after `l2cluster run`)."""
    from l2cluster.results.aggregate import export_experiment

    return _read(args, lambda store: [export_experiment(store, e) for e in experiments],
                 lambda: [_daemon_call("export", e, timeout=300) for e in experiments])


def cmd_results(args) -> int:
    from l2cluster.results.aggregate import FieldError, group_jobs
    from l2cluster.results.report import render

    exports = _exports(args, args.experiments)
    if args.jobs:
        if args.format not in ("table", "json", "csv"):
            raise UserError("--jobs prints a table, JSON or CSV; drop --format or use --format table|json|csv")
        jobs = [{k: v for k, v in j.items() if k != "epochs"} for e in exports for j in e["jobs"]]
        if args.format == "csv":  # every final metric, unrounded, and the whole error
            keys = list(dict.fromkeys(k for j in jobs for k in ((j.get("result") or {}).get("final") or {})))
            header = ("job", "experiment", "label", "seed", "state", "settings", *keys, "error")
            rows = [(j["job"], j["experiment"], j["label"], j["seed"], j["state"], json.dumps(j["overrides"]),
                     *[((j.get("result") or {}).get("final") or {}).get(k, "") for k in keys],
                     j.get("error") or (j.get("result") or {}).get("error") or "") for j in jobs]
            _print_rows("csv", header, rows, jobs)
        else:
            print(json.dumps(jobs, indent=2) if args.format == "json" else _results_table(jobs))
        return 0
    try:
        per_experiment = [group_jobs(e, args.by) for e in exports]
    except FieldError as e:
        raise UserError(str(e)) from None
    print(render(per_experiment, args.format, [e["experiment"] for e in exports]))
    return 0


def cmd_report(args) -> int:
    from l2cluster.results.report import write_report

    written = write_report(_exports(args, args.experiments), args.output)
    print(written["html"])
    for path in [*written["pngs"], written["csv"]]:
        print(path)
    return 0


def cmd_export(args) -> int:
    from l2cluster.results.export import ExportError, export_to

    if args.follow and args.format != "tensorboard":
        raise UserError("--follow writes TensorBoard runs as epochs arrive; use it with --format tensorboard")
    (export,) = _exports(args, [args.experiment])
    try:
        if args.follow:
            _follow_tensorboard(args, export)
            print(args.output)
        else:
            print(export_to(export, args.format, args.output))
    except ExportError as e:
        raise UserError(str(e)) from None
    return 0


def _follow_tensorboard(args, export: dict) -> None:
    """Write the experiment's TensorBoard runs now, then every --interval seconds what is new (epochs, ended
    jobs), until every job has ended."""
    from l2cluster.results.export import SUMMARY_METRICS, TensorBoardExport
    from l2cluster.states import JobState

    with TensorBoardExport(args.output, export, metrics=SUMMARY_METRICS) as tb:
        while True:
            tb.update(export)
            if all(JobState(j["state"]).is_terminal for j in export["jobs"]):
                return
            time.sleep(args.interval)
            (export,) = _exports(args, [args.experiment])


def cmd_logs(args) -> int:
    from l2cluster.results.store import job_log

    info = _read(args, lambda store: job_log(store, args.job), lambda: _daemon_call("logs", args.job))
    if args.format == "json":
        print(json.dumps(info, indent=2, default=str))
        return 0
    if args.format == "csv":  # the per-epoch metrics, one row per epoch
        keys = list(dict.fromkeys(k for m in info["epochs"] for k in m))
        _print_rows("csv", keys, [[m.get(k, "") for k in keys] for m in info["epochs"]], info["epochs"])
        return 0
    print(f"job {info['job']['job']}  ({info['job']['experiment']}, {info['job']['state']})")
    plugins = info["job"].get("plugins")
    if plugins:
        print("plugins: " + ", ".join(f"{name} {version}" for name, version in sorted(plugins.items())))
    for e in info["events"]:
        at = time.strftime("%H:%M:%S", time.localtime(e["at"]))
        change = f"{'note':>9}   {e['to']:<9}" if e["from"] == e["to"] else f"{e['from'] or '-':>9} → {e['to']:<9}"
        print(f"{at}  {change} attempt {e['attempt']}  {e['detail'] or ''}".rstrip())
    for m in info["epochs"]:
        print("epoch " + " ".join(f"{k}={_round(v)}" for k, v in m.items() if k != "epoch") + f" [{m['epoch']}]")
    if info["result"] and info["result"]["final"].get("eager_reason"):
        print(f"note: trained without CUDA graphs: {info['result']['final']['eager_reason']}")
    if info["result"] and info["result"]["error"]:
        print(f"error: {info['result']['error']}")
    return 0


def cmd_store_backup(args) -> int:
    from l2cluster.results.store import Store, default_store

    store = Store.open_read_only(args.store or default_store())
    try:
        print(store.backup(args.dest))
    finally:
        store.close()
    return 0


def cmd_store_check(args) -> int:
    """0: the store is healthy; 1: SQLite's integrity check found problems (listed on stdout); 2: not a store
    that can be opened (missing, another application's file, unreadable)."""
    from l2cluster.results.store import Store, default_store

    store = Store.open_read_only(args.store or default_store())
    try:
        problems = store.integrity_problems()
    except sqlite3.DatabaseError as e:
        problems = [" ".join(str(e).split())]
    finally:
        store.close()
    if problems:
        print("\n".join(problems))
        print(f"{store.path}: {len(problems)} problem(s); restore a backup (`l2cluster store backup` makes one)",
              file=sys.stderr)
        return 1
    print(f"ok: {store.path}")
    return 0


def cmd_run(args) -> int:
    """The embedded default: a local Ray, a coordinator, the whole sweep, the results, a clean shutdown. With
    --address, RAY_ADDRESS or inside a Ray job: that cluster instead (l2cluster.api.run_coordinator)."""
    import ray

    from l2cluster.api import run_coordinator
    from l2cluster.cluster import daemon
    from l2cluster.spec.loading import read_spec_file

    spec = read_spec_file(args.spec)
    store = Path(args.store or daemon.default_store()).resolve()
    t0 = time.perf_counter()
    # Say what is happening from the first second: Ray and the coordinator take a few seconds each to start.
    with run_coordinator(store, address=args.address, num_cpus=args.num_cpus, plugin_dirs=args.plugin_dir or [],
                         data_dir=args.data_dir, idle_release_s=args.idle_release_s,
                         strategy=args.placement_strategy, checkpoint_dir=args.checkpoint_dir,
                         max_jobs=args.max_jobs, max_pack=args.max_pack,
                         say=lambda message: print(message, file=sys.stderr, flush=True)) as target:
        store = target.store
        sub = _daemon_call("submit", spec, args.priority, args.spec, args.rerun)
        print(f"{sub['experiment']}: {sub['jobs']} job(s) on {target.where} with "
              f"{int(ray.cluster_resources().get('CPU', 0))} CPU(s)", file=sys.stderr)
        _say_reused(sub)
        code = _wait_and_report(sub["experiment"])
    print(f"done in {time.perf_counter() - t0:.1f} s; store {store}\n"
          f"more: l2cluster results {sub['experiment']} --store {store}  |  "
          f"l2cluster report {sub['experiment']} --store {store} -o DIR", file=sys.stderr)
    return code


def _round(v):
    return round(v, 5) if isinstance(v, float) else v


def _fmt(v, digits=4) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _row(job, outcome: Outcome, final: dict) -> tuple:
    settings = " ".join(f"{k.split('.')[-1]}={v}" for k, v in job.overrides.items()) or "-"
    return (job.id, job.label or "-", settings, job.seed, outcome.value, _fmt(final.get("val_acc")),
            _fmt(final.get("test_acc")), _fmt(final.get("epochs_run")), _fmt(final.get("train_s"), 1))


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- parser -------------------------------------------------------------------------------------------------
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _priority(text: str) -> int:
    value = int(text)
    if not -(2**31) <= value < 2**31:
        raise argparse.ArgumentTypeError(f"must be between {-(2**31)} and {2**31 - 1}, got {value}")
    return value


def _max_pack_option(p) -> None:
    from l2cluster.packing import CPU_DEFAULT_MAX_PACK, GPU_DEFAULT_MAX_PACK

    p.add_argument("--max-pack", type=_positive, metavar="K",
                   help="train at most K packable jobs together as one stacked model (1: every job alone); default "
                        f"from the device: {CPU_DEFAULT_MAX_PACK} on a CPU, on a GPU what half its memory holds "
                        f"(at most {GPU_DEFAULT_MAX_PACK})")


def _rerun_option(p) -> None:
    p.add_argument("--rerun", action="store_true",
                   help="train again the jobs whose results the store already has (same experiment, config and "
                        "plugin versions); their stored results and epochs are deleted")


# Every subcommand's description and example(s), shown by `l2cluster COMMAND --help` (a test checks that none is
# missing).
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("Check a job spec and count its jobs, without training anything.",
                 "l2cluster validate jobs/compare_regularizers.yaml"),
    "schema": ("Print the JSON Schema of job specs, with every loaded plugin's config (for editors and CI).",
               "l2cluster schema > spec.schema.json"),
    "plugins": ("List the regularizer plugins this process can load, or show one's config with its docs.",
                "l2cluster plugins list\nl2cluster --plugin-dir ./my_plugins plugins show my_reg --format json"),
    "plugins list": ("Name, origin, hooks and status (ok, refused or unavailable, with the reason) of every plugin.",
                     "l2cluster plugins list"),
    "plugins show": ("A plugin's documentation, hooks and config fields (type, default, doc).",
                     "l2cluster plugins show label_smoothing\nl2cluster plugins show l2 --format json"),
    "daemon": ("Start, stop or check the daemon: a coordinator actor on a Ray cluster (a local head on 127.0.0.1 "
               "unless --address names one) that keeps the store and schedules jobs on warm gangs.",
               "l2cluster daemon start --num-cpus 8\nl2cluster daemon status\nl2cluster daemon stop"),
    "submit": ("Queue a spec's jobs on the daemon and print the experiment id; --wait shows progress and the "
               "results.", "l2cluster submit jobs/compare_regularizers.yaml --wait"),
    "status": ("Experiments with their job counts, or one experiment's jobs (an id or a unique prefix of it).",
               "l2cluster status\nl2cluster status quickstart --store ~/.local/state/l2cluster/store.db"),
    "gangs": ("The daemon's warm gangs: busy or idle, the jobs they train, and each rank's process id, node and "
              "the packs it has run (for py-spy, a debugger or a fault test).",
              "l2cluster gangs\nl2cluster gangs 94494366 --format json"),
    "cancel": ("Cancel an experiment's unfinished jobs, or one job (ids or unique prefixes).",
               "l2cluster cancel compare-regularizers-1a2b3c4d\nl2cluster cancel 94494366"),
    "results": ("An experiment's configurations summarized over seeds (mean, sd, 95% CI), ranked by validation "
                "accuracy; several experiments side by side; or one row per job with --jobs.",
                "l2cluster results quickstart --store ~/.local/state/l2cluster/store.db\n"
                "l2cluster results EXP --by regularizers.l2.strength --format csv"),
    "report": ("Write an offline HTML report with plots (and the PNGs and a CSV) of an experiment.",
               "l2cluster report quickstart -o report/ --store ~/.local/state/l2cluster/store.db"),
    "logs": ("A job's plugin versions, state changes, per-epoch metrics and error (with a plugin's traceback).",
             "l2cluster logs 94494366\nl2cluster logs 94494366 --format csv --store store.db"),
    "store": ("Back up or check the store file: the SQLite database (and, while a daemon writes it, its "
              "store.db-wal log) that holds every experiment.",
              "l2cluster store backup ~/backups/store-2026-12-05.db\nl2cluster store check --store store.db"),
    "store backup": ("Copy the store with SQLite's backup API to DEST, a new file: one consistent snapshot, safe "
                     "while the daemon writes, in one self-contained file (no -wal beside it).",
                     "l2cluster store backup ~/backups/store.db --store ~/.local/state/l2cluster/store.db"),
    "store check": ("Run SQLite's integrity check on the store (read-only, beside a running daemon too): prints "
                    "ok, exit code 0; or one line per problem, exit code 1; a file that is not a readable store "
                    "is exit code 2.", "l2cluster store check --store ~/.local/state/l2cluster/store.db"),
    "run": ("Run a spec on an embedded local Ray: start it, train every job, print the results, shut down. The "
            "store keeps the results for `results`, `report` and `status` with --store. With --address, RAY_ADDRESS "
            "or inside a Ray job (`ray job submit -- l2cluster run spec.yaml`): on that cluster, no nested Ray.",
            "l2cluster run jobs/quickstart.yaml --data-dir ../shared/data/mnist"),
    "train": ("Train a spec's jobs one after another in this process, without Ray (the debugging path).",
              "l2cluster train jobs/reference.yaml --limit 1 --device cpu"),
    "watch": ("Re-attach to an experiment on the daemon: live progress until every job has ended, then the "
              "per-job and ranked tables (exit code 1 if a job failed).", "l2cluster watch compare-regularizers"),
    "export": ("Export an experiment's per-epoch metrics, one run or row per job: TensorBoard event files (with "
               "the HParams tab), MLflow runs nested under the experiment's run, or CSV, Parquet or JSON lines.",
               "l2cluster export quickstart --format tensorboard -o tb/ --store ~/.local/state/l2cluster/store.db\n"
               "l2cluster export quickstart --format mlflow -o mlruns/ --store store.db"),
}


def _subcommands(parser: argparse.ArgumentParser, prefix: str = ""):
    """(name, parser) of every subcommand, nested ones as "plugins show"."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + name, sub
                yield from _subcommands(sub, prefix + name + " ")


def _format_option(p, formats=("table", "json", "csv")) -> None:
    p.add_argument("--format", choices=formats, default="table", help="output format (default: table)")


def build_parser() -> argparse.ArgumentParser:
    from l2cluster import __version__
    from l2cluster.limits import DEFAULT_MAX_JOBS
    from l2cluster.results.export import FORMATS as EXPORT_FORMATS
    from l2cluster.results.report import FORMATS

    summary, conventions = __doc__.split("\n\n")[:2]
    parser = argparse.ArgumentParser(prog="l2cluster", description=summary, epilog=conventions,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"l2cluster {__version__}")
    parser.add_argument("--plugin-dir", action="append", metavar="DIR",
                        help="load regularizer plugins from DIR (repeatable; also L2CLUSTER_PLUGIN_DIRS; accepted "
                             "after the subcommand too)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def spec_command(name, fn, help):
        p = sub.add_parser(name, help=help)
        p.add_argument("spec", help="job spec file (.yaml, .yml or .json)")
        p.add_argument("--max-jobs", type=_positive, default=DEFAULT_MAX_JOBS, help="refuse sweeps larger than this")
        p.set_defaults(fn=fn)
        return p

    spec_command("validate", cmd_validate, "check a job spec and count its jobs")
    p = sub.add_parser("schema", help="print the JSON Schema of job specs (with every loaded plugin's config)")
    p.set_defaults(fn=cmd_schema)

    plugins = sub.add_parser("plugins", help="list or show regularizer plugins")
    psub = plugins.add_subparsers(dest="plugins_command", required=True)
    psub.add_parser("list", help="name, origin, hooks and status of every plugin").set_defaults(fn=cmd_plugins_list)
    p = psub.add_parser("show", help="a plugin's config fields with their docs")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="also print the config's JSON Schema (with --format table)")
    _format_option(p)
    p.set_defaults(fn=cmd_plugins_show)

    def daemon_options(p, store_default_help="the local daemon's store"):
        p.add_argument("--store", help=f"SQLite store path (default: {store_default_help})")
        p.add_argument("--data-dir", help="MNIST folder on the coordinator's node (else L2CLUSTER_DATA, the cache)")
        p.add_argument("--idle-release-s", type=float, default=60.0, help="release gangs idle this long")
        p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray head (default: all)")
        p.add_argument("--placement-strategy", choices=("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"),
                       default="STRICT_PACK", help="placement group strategy of a gang's ranks")
        p.add_argument("--checkpoint-dir", help="where every rank writes its job's per-epoch checkpoints (default: "
                       "'checkpoints' beside the store); on a multi-node cluster, shared storage every node sees")
        p.add_argument("--max-jobs", type=_positive, default=DEFAULT_MAX_JOBS,
                       help=f"refuse submissions that expand to more jobs than this (default {DEFAULT_MAX_JOBS})")
        _max_pack_option(p)

    p = sub.add_parser("daemon", help="start, stop or check the daemon (a coordinator on a Ray cluster)")
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--address", help="an existing Ray cluster (else RAY_ADDRESS; else a local head on 127.0.0.1)")
    daemon_options(p)
    p.set_defaults(fn=cmd_daemon)

    p = sub.add_parser("submit", help="queue a spec's jobs on the daemon; prints the experiment id")
    p.add_argument("spec")
    p.add_argument("--priority", type=_priority, default=0, help="higher runs first")
    p.add_argument("--wait", action="store_true", help="wait for every job, showing progress, then print results")
    _rerun_option(p)
    p.add_argument("--address")
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("watch", help="re-attach to a running experiment: live progress, then the results "
                       "(exit code 1 if a job failed)")
    p.add_argument("experiment", metavar="EXP")
    p.add_argument("--address")
    p.set_defaults(fn=cmd_watch)

    p = sub.add_parser("status", help="experiments, or one experiment's jobs")
    p.add_argument("experiment", nargs="?", metavar="EXP", help="an experiment id or a unique prefix of it")
    p.add_argument("--store", help="read this store file directly instead of asking the daemon")
    p.add_argument("--address")
    _format_option(p)
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("gangs", help="the daemon's gangs and each rank's process id and node")
    p.add_argument("job", nargs="?", metavar="JOB", help="only the gang running this job (an id or its prefix)")
    p.add_argument("--address")
    _format_option(p)
    p.set_defaults(fn=cmd_gangs)

    p = sub.add_parser("cancel", help="cancel an experiment's unfinished jobs, or one job")
    p.add_argument("target", metavar="EXP|JOB")
    p.add_argument("--address")
    p.set_defaults(fn=cmd_cancel)

    p = sub.add_parser("results", help="an experiment's configurations summarized over seeds, ranked by validation "
                       "accuracy; several experiments side by side")
    p.add_argument("experiments", nargs="+", metavar="EXP",
                   help="experiment id (two or more: side by side, with Δ test accuracy and Welch's t-test against the "
                        "first)")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    p.add_argument("--by", action="append", metavar="FIELD",
                   help="group by this field instead of the whole configuration: label, seed, job, or a dotted "
                        "config path such as optimizer.lr or regularizers.l2.strength (repeatable)")
    p.add_argument("--jobs", action="store_true", help="one row per job instead (final metrics, state, node)")
    p.add_argument("--store", help="read this store file directly instead of asking the daemon")
    p.add_argument("--address")
    p.set_defaults(fn=cmd_results)

    p = sub.add_parser("report", help="an HTML report with plots (and the PNGs) of an experiment; of several: "
                       "compared with the first (Welch's t-test per shared configuration)")
    p.add_argument("experiments", nargs="+", metavar="EXP", help="experiment id (two or more: compared with the first)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for report.html, the PNGs and "
                   "results.csv (created if missing)")
    p.add_argument("--store", help="read this store file directly instead of asking the daemon")
    p.add_argument("--address")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("export", help="an experiment's per-epoch metrics and final results for TensorBoard, MLflow "
                       "or as a CSV, Parquet or JSON Lines file")
    p.add_argument("experiment", metavar="EXP")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="tensorboard: a folder with one run per job (+ HParams); mlflow: one run per job under one "
                        "per experiment; csv/parquet: one row per job x epoch; jsonl: one JSON object per line")
    p.add_argument("-o", "--output", required=True, metavar="DEST", help="the file (csv, parquet, jsonl), a new or "
                   "empty folder (tensorboard), or a folder or tracking URI such as sqlite:///PATH/mlflow.db (mlflow)")
    p.add_argument("--follow", action="store_true", help="tensorboard: keep writing each job's new epochs as they "
                   "are stored, until every job has ended (point `tensorboard --logdir` at DEST meanwhile)")
    p.add_argument("--interval", type=float, default=5.0, metavar="S", help="--follow: look for new epochs every S "
                   "seconds (default 5)")
    p.add_argument("--store", help="read this store file directly instead of asking the daemon")
    p.add_argument("--address")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("logs", help="a job's state changes, epochs and error")
    p.add_argument("job", metavar="JOB", help="a job id or a unique prefix of it (as `status` shows)")
    p.add_argument("--store", help="read this store file directly instead of asking the daemon")
    p.add_argument("--address")
    _format_option(p)
    p.set_defaults(fn=cmd_logs)

    p = sub.add_parser("run", help="run a spec on an embedded local Ray and print the results (the default)")
    p.add_argument("spec")
    p.add_argument("--priority", type=_priority, default=0)
    _rerun_option(p)
    daemon_options(p, "~/.local/state/l2cluster/store.db")
    p.add_argument("--address", help="run on this Ray cluster (else RAY_ADDRESS; inside a Ray job, the job's cluster; "
                   "else an embedded local Ray): its running coordinator if it has one, else one for this run")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("store", help="back up or check the store file")
    ssub = p.add_subparsers(dest="store_command", required=True)
    store_help = "the store file (default: the local daemon's, ~/.local/state/l2cluster/store.db or $L2CLUSTER_HOME)"
    p = ssub.add_parser("backup", help="copy the store to one self-contained file, safely while the daemon writes")
    p.add_argument("dest", metavar="DEST", help="the new file (must not exist)")
    p.add_argument("--store", help=store_help)
    p.set_defaults(fn=cmd_store_backup)
    p = ssub.add_parser("check", help="SQLite's integrity check of the store: ok, or the problems (exit code 1)")
    p.add_argument("--store", help=store_help)
    p.set_defaults(fn=cmd_store_check)

    p = spec_command("train", cmd_train, "train a spec's jobs one after another in this process (debugging path)")
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (else L2CLUSTER_DATA, else the cache)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading missing MNIST files")
    p.add_argument("--device", default="auto", help="auto (from the spec's scaling.use_gpu), cpu or cuda")
    p.add_argument("--limit", type=int, default=0, help="run only the first N jobs")
    _max_pack_option(p)

    for name, p in _subcommands(parser):
        description, example = COMMANDS.get(name, ("", ""))
        p.description = description
        if example:
            p.epilog = ("examples" if "\n" in example else "example") + ":\n  " + example.replace("\n", "\n  ")
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        # Global options are accepted after the subcommand too (`l2cluster run spec.yaml --plugin-dir DIR`).
        p.add_argument("--plugin-dir", action="append", metavar="DIR", dest="plugin_dir_after", default=[],
                       help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if os.environ.get("NO_COLOR") and not os.environ.get("FORCE_COLOR"):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's colored worker-log prefixes (no-color.org)
    args = build_parser().parse_args(argv)
    args.plugin_dir = [*(args.plugin_dir or []), *getattr(args, "plugin_dir_after", [])]
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return code
    except BrokenPipeError:  # stdout closed early (`l2cluster schema | head`): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        code = exit_code(e)
        if code is None:  # not the input's fault: a bug, with its traceback
            raise
        print(e.render() if isinstance(e, InputError) else f"error: {e}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
