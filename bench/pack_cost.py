"""Benchmark: what one job costs when K jobs are trained stacked in one Trainer, against K.

For each K it trains K seeds of the reference configuration (jobs/reference.yaml: MLP 784-512-256-128-10,
dropout 0.2, AdamW lr 1e-3, L2 term 0.001, batch 64) as one stacked model, in a fresh process, and prints
seconds per model-epoch (scaled to a full 55,000-image epoch when --train-size or --steps shortens it), the
equivalent throughput in 10-epoch jobs per hour, and the process's peak memory (CUDA: max_memory_allocated;
CPU: peak RSS of the child process, torch and the data set included). A reference row trains the plain loop
(nn.Sequential + fused AdamW, the same L2 term, dropout, batch and validation pass) in the same run.

    python bench/pack_cost.py --data-dir ../shared/data/mnist --steps 100 --threads 1
    python bench/pack_cost.py --data-dir ../shared/data/mnist --device cuda --cuda-graphs off

Validation is scaled with the training set (5,000 images per 55,000) so a short epoch has a full epoch's
proportions. The first epoch (allocation, CUDA-graph capture) is left out of the mean when --epochs > 1. On a
shared machine use --repeats: the rows are measured round-robin and each shows its median (and its minimum).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from l2cluster.registry import load_registry
from l2cluster.spec import expand, parse_spec, read_spec_file
from l2cluster.training import model
from l2cluster.training.data import load_mnist, split_mnist
from l2cluster.training.process import keep_freed_memory
from l2cluster.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
FULL_TRAIN, FULL_VAL, REFERENCE_EPOCHS = 55_000, 5_000, 10


def reference_spec(args, num_models: int):
    """The reference spec with this run's sizes and K seeds."""
    registry = load_registry()
    data = read_spec_file(ROOT / "jobs" / "reference.yaml")
    data["model"]["hidden_sizes"] = args.hidden
    data["data"].update(train_size=args.train_size, val_size=val_size(args.train_size))
    # A sweep takes at most 1,000 seeds: past that, seeds × two L2 strengths (a pack mixes both anyway).
    seeds = num_models if num_models <= 1000 else -(-num_models // 2)
    grid = {} if num_models <= 1000 else {"regularizers.l2.strength": [1e-3, 1.1e-3]}
    data.update(epochs=args.epochs, sweep={"seeds": list(range(seeds)), "grid": grid})
    return parse_spec(data, registry), registry


def val_size(train_size: int | None) -> int:
    return FULL_VAL if train_size is None else max(64, round(FULL_VAL * train_size / FULL_TRAIN))


def load_splits(args, spec):
    splits = split_mnist(load_mnist(args.data_dir), val_size=spec.data.val_size, seed=spec.data.split_seed,
                         train_size=spec.data.train_size)
    # The test pass runs once after training and is not timed; keep it as small as the validation set.
    n = len(splits.val_labels)
    return replace(splits, test_images=splits.test_images[:n], test_labels=splits.test_labels[:n])


def measure_trainer(args, num_models: int, device: torch.device) -> dict:
    spec, registry = reference_spec(args, num_models)
    configs = [job.config for job in expand(spec, registry)][:num_models]
    splits = load_splits(args, spec)
    graphs = {"on": True, "off": False, "auto": None}[args.cuda_graphs]
    trainer = Trainer(configs, splits, registry, device=device, cuda_graphs=graphs)
    results = trainer.fit()
    epoch_s = [m["epoch_s"] for m in results[0].epochs]
    return {"epoch_s": epoch_s, "train_size": len(splits.train_labels), "graphs": trainer.graphs,
            "outcomes": sorted({r.outcome for r in results})}


def plain_model(hidden: list[int]) -> nn.Module:
    sizes, layers = [784, *hidden], []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(0.2)]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 10))


def measure_plain(args, device: torch.device) -> dict:
    """The loop anyone would write: nn.Sequential, fused AdamW, the L2 term over every parameter, batch 64 from
    tensors on the device, and a validation pass per epoch as the trainer does."""
    spec, _ = reference_spec(args, 1)
    splits = load_splits(args, spec)
    features = lambda images: images.reshape(len(images), -1).to(device).float().div_(255)  # noqa: E731
    x, y = features(splits.train_images), splits.train_labels.to(device)
    vx, vy = features(splits.val_images), splits.val_labels.to(device)
    torch.manual_seed(0)
    model = plain_model(args.hidden).to(device)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)
    batch, epoch_s = spec.data.batch_size, []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(y), device=device)
        for s in range(0, len(y), batch):
            idx = order[s:s + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx]) + 0.001 / 2 * sum(p.pow(2).sum() for p in params)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_acc = float((model(vx).argmax(1) == vy).float().mean())
        epoch_s.append(time.perf_counter() - t0)
    return {"epoch_s": epoch_s, "train_size": len(y), "graphs": False, "outcomes": [f"val_acc={val_acc:.3f}"]}


def child(args) -> None:
    """One measurement in this fresh process; prints one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # the trainer does this on CPU; the plain loop gets the same allocator
    if args.per_member_cpu:
        model.PER_MEMBER_DEVICES = {"cpu"}
    device = torch.device(args.device)
    out = measure_plain(args, device) if args.child == 0 else measure_trainer(args, args.child, device)
    if device.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(out), flush=True)


def run_child(args, num_models: int) -> dict:
    argv = [sys.executable, __file__, "--child", str(num_models), "--device", args.device,
            "--epochs", str(args.epochs), "--hidden", *map(str, args.hidden), "--threads", str(args.threads),
            "--cuda-graphs", args.cuda_graphs] + (["--per-member-cpu"] if args.per_member_cpu else [])
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.train_size:
        argv += ["--train-size", str(args.train_size)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"K={num_models} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_epoch_s(measured: dict, k: int) -> float:
    """Seconds per model-epoch, scaled to a full epoch (its steps and its validation scale alike)."""
    timed = measured["epoch_s"][1:] or measured["epoch_s"]
    return sum(timed) / len(timed) * FULL_TRAIN / measured["train_size"] / max(k, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", type=int, nargs="+", help="stack sizes (default CPU: 1 4 16 64; CUDA: up to 1024)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 256, 128])
    parser.add_argument("--train-size", type=int, help="training images per epoch (default: all 55,000)")
    parser.add_argument("--steps", type=int, help="steps per epoch instead of --train-size (batch 64)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per row, round-robin; the median is shown")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--per-member-cpu", action="store_true", help="K > 1 on CPU as K addmm calls, not baddbmm")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-loop reference row")
    parser.add_argument("--json", type=Path, help="write the rows to this file too")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps:
        args.train_size = args.steps * 64
    if args.child is not None:
        child(args)
        return 0
    ks = args.k or ([1, 4, 16, 64] if args.device == "cpu" else [1, 4, 16, 64, 256, 1024])
    threads = args.threads or torch.get_num_threads()
    print(f"device={args.device} torch={torch.__version__} threads={threads} hidden={args.hidden} "
          f"train_size={args.train_size or FULL_TRAIN} epochs={args.epochs} cuda_graphs={args.cuda_graphs} "
          f"cpu_matmuls={'per-member' if args.per_member_cpu else 'batched'}",
          flush=True)
    print(f"{'run':<12}{'s/model-epoch':>15}{'(min)':>9}{'jobs/hour':>11}{'peak_mb':>10}{'graphs':>8}  outcome",
          flush=True)
    runs = ([0] if not args.no_plain else []) + ks
    measured: dict[int, list[dict]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # round-robin, so that a busy spell on a shared machine hits every K alike
        for k in runs:
            measured[k].append(run_child(args, k))
    rows = []
    for k in runs:
        per_run = [model_epoch_s(r, k) for r in measured[k]]
        r = measured[k][-1]
        row = {"run": "plain loop" if k == 0 else f"K={k}", "k": k, "model_epoch_s": statistics.median(per_run),
               "model_epoch_s_each": per_run, "peak_mb": max(m["peak_mb"] for m in measured[k]),
               "graphs": r["graphs"], "outcomes": r["outcomes"]}
        row["jobs_per_hour"] = 3600 / (REFERENCE_EPOCHS * row["model_epoch_s"])
        rows.append(row)
        print(f"{row['run']:<12}{row['model_epoch_s']:>15.3f}{min(per_run):>9.3f}{row['jobs_per_hour']:>11.1f}"
              f"{row['peak_mb']:>10.0f}{str(r['graphs']):>8}  {','.join(r['outcomes'])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    best = min((r for r in rows if r["k"]), key=lambda r: r["model_epoch_s"])
    print(f"cheapest per job: {best['run']} ({best['model_epoch_s']:.3f} s per model-epoch)"
          + (f", {rows[0]['model_epoch_s'] / best['model_epoch_s']:.2f}x the plain loop" if not args.no_plain else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
