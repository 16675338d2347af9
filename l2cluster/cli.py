"""The `l2cluster` command line: validate and inspect specs and plugins, and train a spec's jobs in this process.

User errors (a bad spec, a missing plugin, unreadable data) print the field and the fix — never a traceback —
and exit with code 2. Results go to stdout, logs to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from l2cluster.data import DataError

EXIT_USAGE = 2


class UserError(Exception):
    """An error caused by the input, printed as its message with exit code 2."""


def _registry(args):
    from l2cluster.api import load_plugins

    return load_plugins(args.plugin_dir)


def _load(args, registry):
    from l2cluster.spec import expand, load_spec

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
    from l2cluster.spec import spec_models

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
    try:
        info = registry.get(args.name)
    except KeyError as e:
        raise UserError(e.args[0]) from None
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

    from l2cluster.data import load_mnist, split_mnist
    from l2cluster.log import configure_logging, get_logger
    from l2cluster.packing import group_into_packs, max_members, pack_id, pack_key
    from l2cluster.runner import Member, run_pack
    from l2cluster.trainer import resolve_device

    configure_logging()
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

        def on_result(job_id, result, plog=plog):
            event = plog.info if result["outcome"] == "succeeded" else plog.warning
            event("job_finished", job_id=job_id, outcome=result["outcome"], error=result["error"],
                  **{k: _round(v) for k, v in result["final"].items()})

        try:
            device = device_of(pack[0])
            plog.info("pack_started", jobs=[j.id for j in pack], device=str(device))
            run = run_pack([Member(j.id, j.config) for j in pack], splits_cache[key], registry, device=device,
                           on_epoch=on_epoch, log=plog)
            results = run.results
        except Exception as e:  # one crashing pack must not take the others down
            plog.error("pack_failed", error=f"{type(e).__name__}: {e}")
            results = {j.id: {"outcome": "failed", "final": {}, "error": f"{type(e).__name__}: {e}"} for j in pack}
        for job_id, result in results.items():
            on_result(job_id, result)
            rows[job_id] = (*_row(by_id[job_id], result["outcome"], result["final"]),
                            pid[:8] if len(pack) > 1 else "-", _error_cell(result.get("error")))
    log.info("experiment_finished", jobs=len(jobs), wall_s=round(time.perf_counter() - t0, 2))
    ordered = [rows[j.id] for j in jobs if j.id in rows]
    print(_table(("job", "variant", "settings", "seed", "outcome", "val_acc", "test_acc", "epochs", "train_s", "pack",
                  "error"), ordered))
    return 0 if all(r[4] != "failed" for r in ordered) else 1


# -- the daemon ---------------------------------------------------------------------------------------------
def _daemon_call(fn, *args, **kwargs):
    """l2cluster.api.call_coordinator, with an unknown experiment or job as a UserError."""
    from l2cluster.api import call_coordinator

    try:
        return call_coordinator(fn, *args, **kwargs)
    except KeyError as e:
        raise UserError(e.args[0]) from None


def cmd_daemon(args) -> int:
    from l2cluster import daemon
    from l2cluster.api import check_store, start_coordinator

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
        print("local daemon stopped" if daemon.stop_local_daemon() else "no local daemon was running")
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
    and the configurations ranked by validation accuracy."""
    from l2cluster.aggregate import group_jobs
    from l2cluster.api import follow
    from l2cluster.report import render

    plan = _daemon_call("export", experiment, False, timeout=300)
    follow(experiment, lambda: _daemon_call("status", experiment),
           {j["job"]: j["config"]["epochs"] for j in plan["jobs"]}, sys.stderr)
    export = _daemon_call("export", experiment, timeout=300)
    print(_results_table(export["jobs"]))
    print()
    print(render([group_jobs(export)], "table", [experiment]))
    return 1 if any(j["state"] == "failed" for j in export["jobs"]) else 0


def _results_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        final = (r.get("result") or {}).get("final") or {}
        settings = " ".join(f"{k.split('.')[-1]}={v}" for k, v in r["overrides"].items()) or "-"
        error = r.get("error") or (r.get("result") or {}).get("error")
        out.append((r["job"], r["label"] or "-", settings, r["seed"], r["state"], _fmt(final.get("val_acc")),
                    _fmt(final.get("test_acc")), _fmt(final.get("epochs_run")), r["node"] or "-", _error_cell(error)))
    return _table(("job", "variant", "settings", "seed", "outcome", "val_acc", "test_acc", "epochs", "node", "error"),
                  out)


def _error_cell(error: str | None, width: int = 60) -> str:
    """A job's error in a table cell: its first line, cut to `width` characters ("-" when there is none);
    `l2cluster logs JOB` shows all of it."""
    if not error or not error.strip():
        return "-"
    line = error.strip().splitlines()[0]
    return line if len(line) <= width else line[: width - 1] + "…"


def cmd_status(args) -> int:
    from l2cluster.daemon import connect

    connect(args.address)
    if args.experiment is None:
        rows = [(e["experiment"], e["priority"], time.strftime("%Y-%m-%d %H:%M", time.localtime(e["submitted_at"])),
                 " ".join(f"{k}={v}" for k, v in sorted(e["counts"].items())))
                for e in _daemon_call("status")]
        print(_table(("experiment", "priority", "submitted", "jobs"), rows))
        return 0
    jobs = _daemon_call("status", args.experiment)
    rows = [(j["job"], j["label"] or "-", j["seed"], j["state"], j["epoch"], j["attempts"], _pack_cell(j),
             j["node"] or "-") for j in jobs]
    print(_table(("job", "variant", "seed", "state", "epoch", "attempts", "pack", "node"), rows))
    return 0


def _pack_cell(job: dict) -> str:
    """The pack a job ran (or runs) in: its id's first 8 digits, "-" for a job trained alone."""
    pack = job.get("pack")
    return pack[:8] if pack and pack != job["job"] else "-"


def cmd_cancel(args) -> int:
    from l2cluster.daemon import connect

    connect(args.address)
    n = _daemon_call("cancel", args.target)
    print(f"cancelled {n} job(s)")
    return 0


def _exports(args, experiments: Sequence[str]) -> list[dict]:
    """The experiments' jobs with results and epochs: from the coordinator (works on any cluster), or read
    straight from a store file with --store (no daemon needed, e.g. after `l2cluster run`)."""
    from l2cluster.aggregate import export_experiment

    if args.store:
        from l2cluster.store import Store

        store = Store.open_read_only(args.store)
        try:
            return [export_experiment(store, e) for e in experiments]
        except KeyError as e:
            raise UserError(e.args[0]) from None
        finally:
            store.close()
    from l2cluster.daemon import DaemonError, connect

    try:
        connect(args.address)
    except DaemonError as e:
        raise UserError(f"{e}; or read a store file directly with --store PATH") from None
    return [_daemon_call("export", e, timeout=300) for e in experiments]


def cmd_results(args) -> int:
    from l2cluster.aggregate import FieldError, group_jobs
    from l2cluster.report import render

    exports = _exports(args, args.experiments)
    if args.jobs:
        if args.format not in ("table", "json"):
            raise UserError("--jobs prints a table or JSON; drop --format or use --format table|json")
        jobs = [{k: v for k, v in j.items() if k != "epochs"} for e in exports for j in e["jobs"]]
        print(json.dumps(jobs, indent=2) if args.format == "json" else _results_table(jobs))
        return 0
    try:
        per_experiment = [group_jobs(e, args.by) for e in exports]
    except FieldError as e:
        raise UserError(str(e)) from None
    print(render(per_experiment, args.format, [e["experiment"] for e in exports]))
    return 0


def cmd_report(args) -> int:
    from l2cluster.report import write_report

    (export,) = _exports(args, [args.experiment])
    written = write_report(export, args.output)
    print(written["html"])
    for path in [*written["pngs"], written["csv"]]:
        print(path)
    return 0


def cmd_logs(args) -> int:
    from l2cluster.daemon import connect

    connect(args.address)
    info = _daemon_call("logs", args.job)
    plugins = info["job"].get("plugins")
    if plugins:
        print("plugins: " + ", ".join(f"{name} {version}" for name, version in sorted(plugins.items())))
    for e in info["events"]:
        at = time.strftime("%H:%M:%S", time.localtime(e["at"]))
        print(f"{at}  {e['from'] or '-':>9} → {e['to']:<9} attempt {e['attempt']}  {e['detail'] or ''}".rstrip())
    for m in info["epochs"]:
        print("epoch " + " ".join(f"{k}={_round(v)}" for k, v in m.items() if k != "epoch") + f" [{m['epoch']}]")
    if info["result"] and info["result"]["final"].get("eager_reason"):
        print(f"note: trained without CUDA graphs: {info['result']['final']['eager_reason']}")
    if info["result"] and info["result"]["error"]:
        print(f"error: {info['result']['error']}")
    return 0


def cmd_run(args) -> int:
    """The embedded default: a local Ray, a coordinator, the whole sweep, the results, a clean shutdown."""
    import ray

    from l2cluster import daemon
    from l2cluster.api import embedded_coordinator
    from l2cluster.spec import read_spec_file

    spec = read_spec_file(args.spec)
    store = Path(args.store or daemon.default_store()).resolve()
    t0 = time.perf_counter()
    with embedded_coordinator(store, num_cpus=args.num_cpus, plugin_dirs=args.plugin_dir or [],
                              data_dir=args.data_dir, idle_release_s=args.idle_release_s,
                              strategy=args.placement_strategy, checkpoint_dir=args.checkpoint_dir,
                              max_jobs=args.max_jobs, max_pack=args.max_pack):
        sub = _daemon_call("submit", spec, args.priority, args.spec, args.rerun)
        print(f"{sub['experiment']}: {sub['jobs']} job(s) on a local Ray with "
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


def _row(job, outcome: str, final: dict) -> tuple:
    settings = " ".join(f"{k.split('.')[-1]}={v}" for k, v in job.overrides.items()) or "-"
    return (job.id, job.label or "-", settings, job.seed, outcome, _fmt(final.get("val_acc")),
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


def build_parser() -> argparse.ArgumentParser:
    from l2cluster.report import FORMATS
    from l2cluster.spec import DEFAULT_MAX_JOBS

    parser = argparse.ArgumentParser(prog="l2cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--plugin-dir", action="append", metavar="DIR",
                        help="load regularizer plugins from DIR (repeatable; also L2CLUSTER_PLUGIN_DIRS)")
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--json", action="store_true", help="also print the config's JSON Schema")
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

    p = sub.add_parser("status", help="experiments, or one experiment's jobs")
    p.add_argument("experiment", nargs="?")
    p.add_argument("--address")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("cancel", help="cancel an experiment's unfinished jobs, or one job")
    p.add_argument("target", metavar="EXP|JOB")
    p.add_argument("--address")
    p.set_defaults(fn=cmd_cancel)

    p = sub.add_parser("results", help="an experiment's configurations summarized over seeds, ranked by validation "
                       "accuracy; several experiments side by side")
    p.add_argument("experiments", nargs="+", metavar="EXP", help="experiment id (two or more: compared side by side)")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    p.add_argument("--by", action="append", metavar="FIELD",
                   help="group by this field instead of the whole configuration: label, seed, job, or a dotted "
                        "config path such as optimizer.lr or regularizers.l2.strength (repeatable)")
    p.add_argument("--jobs", action="store_true", help="one row per job instead (final metrics, state, node)")
    p.add_argument("--store", help="read this store file directly instead of asking the daemon")
    p.add_argument("--address")
    p.set_defaults(fn=cmd_results)

    p = sub.add_parser("report", help="an HTML report with plots (and the PNGs) of an experiment")
    p.add_argument("experiment", metavar="EXP")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for report.html, the PNGs and "
                   "results.csv (created if missing)")
    p.add_argument("--store", help="read this store file directly instead of asking the daemon")
    p.add_argument("--address")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("logs", help="a job's state changes, epochs and error")
    p.add_argument("job")
    p.add_argument("--address")
    p.set_defaults(fn=cmd_logs)

    p = sub.add_parser("run", help="run a spec on an embedded local Ray and print the results (the default)")
    p.add_argument("spec")
    p.add_argument("--priority", type=_priority, default=0)
    _rerun_option(p)
    daemon_options(p, "~/.local/state/l2cluster/store.db")
    p.set_defaults(fn=cmd_run)

    p = spec_command("train", cmd_train, "train a spec's jobs one after another in this process (debugging path)")
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (else L2CLUSTER_DATA, else the cache)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading missing MNIST files")
    p.add_argument("--device", default="auto", help="auto (from the spec's scaling.use_gpu), cpu or cuda")
    p.add_argument("--limit", type=int, default=0, help="run only the first N jobs")
    _max_pack_option(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from l2cluster.plugin import PluginError
    from l2cluster.spec import SpecError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as e:
        print(e.render(), file=sys.stderr)
    except (UserError, DataError, PluginError) as e:
        print(f"error: {e}", file=sys.stderr)
    except Exception as e:
        from l2cluster.daemon import DaemonError
        from l2cluster.store import StoreError

        if not isinstance(e, (DaemonError, StoreError)):
            raise
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`l2cluster schema | head`): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
