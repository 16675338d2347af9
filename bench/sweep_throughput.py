"""Benchmark: one N-job sweep run four ways on the same machine, in one run: jobs per minute and test accuracy.

The sweep (defaults): MLP 784-256-128-10, dropout 0.2 after each hidden layer, AdamW lr 1e-3 (weight_decay 0),
an L2 term strength·Σ‖w‖²/2 over every parameter added to the loss, strengths 0, 1e-4, 1e-3, 1e-2 × seeds 0, 1, 2
= 12 jobs, 20,000 training images (l2cluster's split: 5,000 validation images held out first), 3 epochs,
batch 64, on 2 CPUs. Every job trains on one CPU with one torch thread; everything runs on the CPU.

  (a) Ray Tune running the article's loop: one trial per job, max_concurrent_trials = CPUs, each trial reading
      torchvision `MNIST` + `ToTensor` through `DataLoader(batch_size=64, shuffle=True)` (a `Subset` with the
      same 20,000 training images), an `nn.Sequential` model, test accuracy at the end.
  (b) Ray Tune with a well-written loop: the split as tensors in memory, put in Ray's object store once with
      `tune.with_parameters`, shuffled index batches, fused AdamW, `reuse_actors=True`, the same model and
      objective, validation accuracy each epoch (5,000 images held out as l2cluster does), test at the end.
  (c) l2cluster unpacked: `l2cluster run SPEC --num-cpus N --max-pack 1` in a subprocess (fresh store).
  (d) l2cluster packed: the same with `--max-pack K` (`--max-pack` here; default: l2cluster chooses).

    python bench/sweep_throughput.py --data-dir ../shared/data/mnist [--ways a,b,c,d] [--json OUT]
    make bench-sweep

Wall time counts from launching a way (Ray start included) to its last result: for (a) and (b) until
`Tuner.fit()` returns, for (c) and (d) until the last job's finish time in the store (the subprocess's whole
run, Ray shutdown included, is in the JSON as `process_s`). Needs the `bench` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from l2cluster.results.store import Store
from l2cluster.training.data import load_mnist, split_mnist

# The 5,000 validation images and their seed are l2cluster's defaults (data.val_size, data.split_seed).
VAL_SIZE = 5000
SPLIT_SEED = 0
LR = 1e-3
DROPOUT = 0.2
BATCH = 64
WAYS = {
    "a": "Tune, article loop",
    "b": "Tune, in-memory loop",
    "c": "l2cluster, max-pack 1",
    "d": "l2cluster, packed",
}


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# -- the model and objective shared by (a) and (b) ------------------------------------------------------------
def mlp(hidden: list[int]) -> nn.Module:
    """784 → hidden… → 10 with ReLU and dropout after every hidden layer (l2cluster's `dropout` does the same)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = 784
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(DROPOUT)]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def l2_term(model: nn.Module, strength: float) -> torch.Tensor:
    # The article's term: every parameter, biases included (l2cluster's exclude_bias_and_1d: false).
    return strength * sum(p.pow(2).sum() for p in model.parameters()) / 2


# -- (a) the article's loop as a Tune trial ---------------------------------------------------------------------
def article_trial(config: dict, root: str, train_indices: list[int], epochs: int, hidden: list[int]) -> None:
    from ray import tune
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    torch.set_num_threads(1)
    torch.manual_seed(config["seed"])
    train = Subset(datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor()), train_indices)
    test = datasets.MNIST(root, train=False, download=False, transform=transforms.ToTensor())
    loader = DataLoader(train, batch_size=BATCH, shuffle=True)
    model = mlp(hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    criterion = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y) + l2_term(model, config["strength"])
            loss.backward()
            optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=1000):
            correct += (model(x).argmax(1) == y).sum().item()
    tune.report({"test_acc": correct / len(test)})


# -- (b) a well-written loop as a Tune trial --------------------------------------------------------------------
def in_memory_trial(config: dict, data: dict, epochs: int, hidden: list[int]) -> None:
    from ray import tune

    torch.set_num_threads(1)
    torch.manual_seed(config["seed"])
    # uint8 in the object store (a quarter of the bytes); ToTensor's scaling once per trial, not per batch.
    x_train, y_train = data["train_images"].flatten(1).float().div_(255), data["train_labels"].long()
    x_val, y_val = data["val_images"].flatten(1).float().div_(255), data["val_labels"].long()
    x_test, y_test = data["test_images"].flatten(1).float().div_(255), data["test_labels"].long()
    model = mlp(hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    criterion = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(config["seed"])

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        model.eval()
        with torch.no_grad():
            return (model(x).argmax(1) == y).float().mean().item()

    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=shuffle)
        for start in range(0, len(order), BATCH):
            index = order[start:start + BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x_train[index]), y_train[index]) + l2_term(model, config["strength"])
            loss.backward()
            optimizer.step()
        metrics = {"epoch": epoch, "val_acc": accuracy(x_val, y_val)}
        if epoch == epochs:
            metrics["test_acc"] = accuracy(x_test, y_test)
        tune.report(metrics)


def run_tune(way: str, args, storage: Path) -> dict:
    """Start a local Ray, run the sweep as one Tune trial per job, stop Ray; wall time ends when fit() returns."""
    import ray
    from ray import tune

    param_space = {"strength": tune.grid_search(args.strengths), "seed": tune.grid_search(args.seeds)}
    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, address="local", log_to_driver=False)
    try:
        if way == "a":
            trainable = tune.with_parameters(article_trial, root=str(args.torchvision_root),
                                             train_indices=args.train_indices, epochs=args.epochs, hidden=args.hidden)
            reuse = False  # Tune's default
        else:
            trainable = tune.with_parameters(in_memory_trial, data=args.splits, epochs=args.epochs,
                                             hidden=args.hidden)
            reuse = True
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=args.cpus, reuse_actors=reuse),
            run_config=tune.RunConfig(storage_path=str(storage), name=f"way-{way}", verbose=0),
        )
        with contextlib.redirect_stdout(sys.stderr):  # Tune's progress is a log: stdout keeps the table
            results = tuner.fit()
        wall_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    accs = [r.metrics["test_acc"] for r in results if r.error is None and "test_acc" in r.metrics]
    return {"jobs": len(accs), "failed": len(results) - len(accs), "wall_s": wall_s, "test_accs": accs}


# -- (c), (d) l2cluster -----------------------------------------------------------------------------------------
def sweep_spec(args) -> dict:
    """The sweep as an l2cluster job spec: the same model, data, objective and grid as the Tune ways."""
    return {
        "name": "sweep-throughput",
        "description": "bench/sweep_throughput.py: the sweep timed against Ray Tune.",
        "model": {"hidden_sizes": list(args.hidden), "activation": "relu"},
        "data": {"batch_size": BATCH, "train_size": args.train_size, "val_size": VAL_SIZE, "split_seed": SPLIT_SEED},
        "optimizer": {"name": "adamw", "lr": LR, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "epochs": args.epochs,
        "regularizers": [
            {"name": "l2", "strength": args.strengths[0], "exclude_bias_and_1d": False},
            {"name": "dropout", "p": DROPOUT},
        ],
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},
        "sweep": {"seeds": list(args.seeds), "grid": {"regularizers.l2.strength": list(args.strengths)}},
    }


def has_max_pack() -> bool:
    """Whether this l2cluster's `run` takes --max-pack (it is being added alongside this script)."""
    out = subprocess.run([l2cluster_bin(), "run", "--help"], capture_output=True, text=True, check=True).stdout
    return "--max-pack" in out


def l2cluster_bin() -> str:
    beside = Path(sys.executable).with_name("l2cluster")
    return str(beside) if beside.exists() else "l2cluster"


def run_l2cluster(args, work: Path, max_pack: int | None, env: dict) -> dict:
    """`l2cluster run` in a subprocess with a fresh store; wall time ends at the last job's stored finish time."""
    work.mkdir(parents=True)
    spec = work / "spec.yaml"
    spec.write_text(yaml.safe_dump(sweep_spec(args), sort_keys=False))
    store_path = work / "store.db"
    cmd = [l2cluster_bin(), "run", str(spec), "--store", str(store_path), "--num-cpus", str(args.cpus)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if max_pack is not None:
        cmd += ["--max-pack", str(max_pack)]
    started = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    process_s = time.perf_counter() - t0
    (work / "stdout.txt").write_text(proc.stdout)
    (work / "stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise RuntimeError(f"`l2cluster run` exited {proc.returncode}: {last}\n  command: {' '.join(cmd)}\n"
                           f"  stderr ends:\n{proc.stderr[-2000:]}")
    store = Store.open_read_only(store_path)
    try:
        jobs = store.jobs()
        results = [store.result(j["id"]) for j in jobs]
    finally:
        store.close()
    accs = [r["final"]["test_acc"] for r in results if r and r["outcome"] == "succeeded"]
    last = max(j["finished_at"] for j in jobs if j["finished_at"] is not None)
    return {"jobs": len(accs), "failed": len(jobs) - len(accs), "wall_s": last - started, "process_s": process_s,
            "test_accs": accs, "max_pack": max_pack, "command": cmd}


# -- driver -----------------------------------------------------------------------------------------------------
def prepare_data(args) -> None:
    """The split every way trains on, before any clock starts: tensors for (b), indices and a torchvision-layout
    copy for (a). (c) and (d) make the same split themselves from the same files."""
    mnist = load_mnist(args.data_dir)
    split = dict(val_size=VAL_SIZE, seed=SPLIT_SEED, train_size=args.train_size)
    s = split_mnist(mnist, **split)
    args.splits = {k: getattr(s, k) for k in ("train_images", "train_labels", "val_images", "val_labels",
                                              "test_images", "test_labels")}
    # The same training indices for the torchvision dataset: split a tensor of positions the same way.
    tagged = type(mnist)(train_images=mnist.train_images, train_labels=torch.arange(len(mnist.train_labels)),
                         test_images=mnist.test_images, test_labels=mnist.test_labels)
    args.train_indices = split_mnist(tagged, **split).train_labels.tolist()


def ratio(figures: dict, way: str, base: str) -> float | None:
    if way not in figures or base not in figures or not figures[base]["jobs_per_min"]:
        return None
    return figures[way]["jobs_per_min"] / figures[base]["jobs_per_min"]


def print_table(figures: dict) -> None:
    print(f"{'way':<26}{'jobs':>5}{'wall s':>9}{'jobs/min':>10}{'vs (a)':>8}{'vs (b)':>8}{'test acc %':>12}")
    for way, f in figures.items():
        cells = [f"{r:.2f}x" if r is not None else "-" for r in (ratio(figures, way, "a"), ratio(figures, way, "b"))]
        acc = f"{100 * f['test_acc_mean']:.2f}" if f["test_acc_mean"] is not None else "-"
        print(f"{'(' + way + ') ' + f['name']:<26}{f['jobs']:>5}{f['wall_s']:>9.1f}{f['jobs_per_min']:>10.2f}"
              f"{cells[0]:>8}{cells[1]:>8}{acc:>12}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ways", default="a,b,c,d", help="which ways to run, comma-separated (default: a,b,c,d)")
    p.add_argument("--seeds", type=parse_ints, default=[0, 1, 2], help="comma-separated (default: 0,1,2)")
    p.add_argument("--strengths", type=parse_floats, default=[0.0, 1e-4, 1e-3, 1e-2],
                   help="L2 strengths, comma-separated (default: 0,1e-4,1e-3,1e-2)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=20_000, help="training images (default 20000)")
    p.add_argument("--hidden", type=parse_ints, default=[256, 128], help="hidden widths (default: 256,128)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of every way's Ray; one job per CPU (default 2)")
    p.add_argument("--max-pack", type=int, default=None,
                   help="jobs l2cluster may pack into one stacked model in (d) (default: l2cluster chooses)")
    p.add_argument("--data-dir", default=None, help="MNIST folder (else L2CLUSTER_DATA, the cache)")
    p.add_argument("--json", type=Path, help="write the figures to this file too")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (stores, Tune results, logs)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = sorted(set(ways) - set(WAYS))
    if unknown or not ways:
        raise SystemExit(f"--ways: unknown way(s) {', '.join(unknown) or '(none)'}; use some of a,b,c,d")
    if not args.seeds or not args.strengths:
        raise SystemExit("--seeds and --strengths each need at least one value")
    num_jobs = len(args.seeds) * len(args.strengths)
    # l2cluster starts Ray itself (token auth on); only this process's own Ray for Tune runs without tokens.
    l2cluster_env = dict(os.environ)
    os.environ["RAY_AUTH_MODE"] = "disabled"

    notes = []
    pack_flag = has_max_pack() if {"c", "d"} & set(ways) else True
    if not pack_flag:
        notes.append("this l2cluster's `run` has no --max-pack yet: (c) runs without it, (d) is skipped")
        ways = [w for w in ways if w != "d"]
    print(f"sweep: {len(args.strengths)} strengths × {len(args.seeds)} seeds = {num_jobs} jobs; "
          f"MLP 784-{'-'.join(map(str, args.hidden))}-10, {args.train_size} images, {args.epochs} epochs, "
          f"batch {BATCH}, {args.cpus} CPUs; torch {torch.__version__}; ways {','.join(ways)}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="l2c-sweep-bench-"))
    figures: dict[str, dict] = {}
    try:
        prepare_data(args)
        if "a" in ways:
            from reference_vs_l2cluster import torchvision_root  # bench/ is on sys.path when run as a script

            args.torchvision_root = torchvision_root(args.data_dir)
        for way in ways:
            print(f"running ({way}) {WAYS[way]} …", file=sys.stderr, flush=True)
            try:
                if way in ("a", "b"):
                    run = run_tune(way, args, work / "tune")
                else:
                    pack = (1 if pack_flag else None) if way == "c" else args.max_pack
                    run = run_l2cluster(args, work / f"l2cluster-{way}", pack, l2cluster_env)
            except Exception as e:  # one broken way must not lose the others' figures
                print(f"  ({way}) failed: {e}", file=sys.stderr, flush=True)
                notes.append(f"({way}) {WAYS[way]} failed: {str(e).splitlines()[0]}")
                continue
            accs = run["test_accs"]
            run.update(name=WAYS[way], jobs_per_min=60 * run["jobs"] / run["wall_s"],
                       test_acc_mean=sum(accs) / len(accs) if accs else None)
            figures[way] = run
            print(f"  ({way}) {run['jobs']} jobs in {run['wall_s']:.1f} s", file=sys.stderr, flush=True)
    finally:
        if "a" in ways and getattr(args, "torchvision_root", None):
            shutil.rmtree(args.torchvision_root, ignore_errors=True)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print_table(figures)
    for note in notes:
        print(f"note: {note}")
    if any(f["failed"] for f in figures.values()):
        print("note: some jobs failed: " + ", ".join(f"({w}) {f['failed']}" for w, f in figures.items()))
    if args.json:
        args.json.write_text(json.dumps({
            "sweep": {"strengths": args.strengths, "seeds": args.seeds, "epochs": args.epochs,
                      "train_size": args.train_size, "hidden": args.hidden, "cpus": args.cpus, "batch": BATCH},
            "torch": torch.__version__,
            "ways": {w: {**f, "vs_a": ratio(figures, w, "a"), "vs_b": ratio(figures, w, "b")}
                     for w, f in figures.items()},
            "notes": notes,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
