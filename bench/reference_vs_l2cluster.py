"""Benchmark: the article's training loop vs l2cluster's trainer on the reference configuration, same run.

The reference: MLP 784-512-256-128-10, dropout 0.2, AdamW lr 1e-3 (weight_decay 0), an L2 term
0.001·Σ‖w‖²/2 over every parameter added to the loss at each step, batch 64. "The article's loop" is
torchvision `MNIST` + `ToTensor` + `DataLoader(batch_size=64, shuffle=True)` with an `nn.Sequential` model
(plus the `nn.Flatten` the article forgot). Both train on the same 55,000 images (the 5,000 l2cluster holds out
for validation are left out of both) and are scored on the 10,000 test images.

    python bench/reference_vs_l2cluster.py --data-dir ../shared/data/mnist [--epochs 2] [--device cuda] [--stack 16]

Prints per-epoch seconds of each, the speed-up, and both test accuracies. With --stack K it also trains K
seeds as one stacked model and prints the time per model-epoch.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from l2cluster.registry import load_registry
from l2cluster.spec import expand, parse_spec, read_spec_file
from l2cluster.training.data import MNIST_FILES, find_mnist, load_mnist, split_mnist
from l2cluster.training.process import keep_freed_memory
from l2cluster.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def torchvision_root(data_dir: str | None) -> Path:
    """A folder in torchvision's layout (MNIST/raw/, uncompressed), made from wherever l2cluster finds MNIST."""
    files = find_mnist(data_dir)
    root = Path(tempfile.mkdtemp(prefix="l2c-bench-"))
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for key, path in files.items():
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as src, open(raw / MNIST_FILES[key], "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


def article_model() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(256, 128), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(128, 10),
    )


def run_article_loop(root: Path, train_indices: torch.Tensor, epochs: int, device: torch.device, seed: int) -> dict:
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    train = Subset(datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor()),
                   train_indices.tolist())
    test = datasets.MNIST(root, train=False, download=False, transform=transforms.ToTensor())
    loader = DataLoader(train, batch_size=64, shuffle=True)
    model = article_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    criterion = nn.CrossEntropyLoss()
    epoch_s = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss = loss + 0.001 * sum(p.pow(2).sum() for p in model.parameters()) / 2
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_s.append(time.perf_counter() - t0)
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=1000):
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return {"epoch_s": epoch_s, "test_acc": correct / len(test)}


def run_l2cluster(data_dir, epochs: int, device: torch.device, seeds: list[int]) -> dict:
    registry = load_registry()
    data = read_spec_file(ROOT / "jobs" / "reference.yaml")
    data.update(epochs=epochs, sweep={"seeds": seeds})
    spec = parse_spec(data, registry)
    configs = [job.config for job in expand(spec, registry)]
    splits = split_mnist(load_mnist(data_dir), val_size=spec.data.val_size, seed=spec.data.split_seed)
    trainer = Trainer(configs, splits, registry, device=device)
    results = trainer.fit()
    return {
        "epoch_s": [m["epoch_s"] for m in results[0].epochs],
        "test_acc": [r.final["test_acc"] for r in results],
        "outcomes": [r.outcome for r in results],
    }


def train_indices(data_dir) -> torch.Tensor:
    """The 55,000 training indices l2cluster uses (its validation split held out), for the article loop too."""
    mnist = load_mnist(data_dir)
    n = len(mnist.train_labels)
    marker = torch.arange(n, dtype=torch.int64)
    tagged = type(mnist)(train_images=mnist.train_images, train_labels=marker,
                         test_images=mnist.test_images, test_labels=mnist.test_labels)
    return split_mnist(tagged, val_size=5000, seed=0).train_labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stack", type=int, default=0, help="also train K seeds stacked and time it")
    parser.add_argument("--json", type=Path, help="write the figures to this file too")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both loops (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # The same allocator setting for both loops, so the ratio measures the training loops alone.
    keep_freed_memory()
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} epochs={args.epochs}",
          flush=True)

    root = torchvision_root(args.data_dir)
    try:
        article = run_article_loop(root, train_indices(args.data_dir), args.epochs, device, seed=0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ours = run_l2cluster(args.data_dir, args.epochs, device, seeds=[0])
    a_ep = sum(article["epoch_s"]) / len(article["epoch_s"])
    o_ep = sum(ours["epoch_s"]) / len(ours["epoch_s"])
    figures = {
        "device": str(device), "epochs": args.epochs,
        "article_epoch_s": article["epoch_s"], "article_test_acc": article["test_acc"],
        "l2cluster_epoch_s": ours["epoch_s"], "l2cluster_test_acc": ours["test_acc"][0],
        "speedup": a_ep / o_ep,
    }
    print(f"{'loop':<22}{'epoch_s (mean)':>16}{'epoch_s (each)':>32}{'test_acc':>10}")
    print(f"{'article (DataLoader)':<22}{a_ep:>16.3f}{str([round(t, 2) for t in article['epoch_s']]):>32}"
          f"{article['test_acc']:>10.4f}")
    print(f"{'l2cluster trainer':<22}{o_ep:>16.3f}{str([round(t, 2) for t in ours['epoch_s']]):>32}"
          f"{ours['test_acc'][0]:>10.4f}")
    print(f"speed-up per epoch: {a_ep / o_ep:.2f}x")
    if args.stack:
        stacked = run_l2cluster(args.data_dir, args.epochs, device, seeds=list(range(args.stack)))
        s_ep = sum(stacked["epoch_s"]) / len(stacked["epoch_s"])
        accs = stacked["test_acc"]
        figures.update(stack=args.stack, stack_epoch_s=s_ep, stack_model_epoch_s=s_ep / args.stack,
                       stack_test_acc_mean=sum(accs) / len(accs))
        print(f"stacked K={args.stack}: {s_ep:.3f} s per epoch = {s_ep / args.stack:.4f} s per model-epoch "
              f"({a_ep / (s_ep / args.stack):.1f}x the article loop); mean test_acc {sum(accs) / len(accs):.4f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
