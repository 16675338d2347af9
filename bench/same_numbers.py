"""Does a change leave the trainer's numbers as they were, bit for bit? Two revisions train the same stacks.

Each revision (BEFORE, AFTER; AFTER may be WORKTREE, the working tree with its uncommitted changes) is checked out
into a temporary worktree, as bench/compare_revisions.py does, and trains nine stacks on the test suite's
synthetic data with its own package and its own test plugins (tests/support.py), on the CPU, one thread:

  plain; dropout + L2 (K = 2); all eight built-ins together (K = 3); a gradient hook skipping never, some and all
  steps (K = 3); a NaN penalty the trainer blames on its plugin by replaying the epoch (K = 3); an inf penalty (a
  divergence, K = 2); SGD with Nesterov and a cosine schedule (K = 2); a plateau schedule; a step schedule.

Per stack it prints a sha256 of every final parameter and whether the per-epoch metrics, outcomes, errors and
final numbers (times left out) are equal. Exit status 0 when every stack is equal on both sides, 1 otherwise.

    python bench/same_numbers.py 58eed10 HEAD
    python bench/same_numbers.py HEAD            # HEAD against the working tree
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from compare_revisions import WORKTREE, add_worktree, describe, remove_worktree, side_env

# Runs inside a side's worktree (its package and its tests/support.py); prints one JSON object.
TRAIN = r'''
import hashlib, json, sys
import torch
sys.path.insert(0, "tests")
from support import InfGradients, InfPenalty, NanPenalty, config, registry_with, synthetic_splits
try:
    from l2cluster.training.trainer import Trainer
except ImportError:  # before the subpackages
    from l2cluster.trainer import Trainer

torch.set_num_threads(1)
reg = registry_with(InfGradients, NanPenalty, InfPenalty)
base = dict(data={"batch_size": 16, "val_size": 64}, epochs=2, model={"hidden_sizes": [32, 16]})
everything = [{"name": "mixup", "alpha": 0.2}, {"name": "label_smoothing", "epsilon": 0.1},
              {"name": "dropout", "p": 0.1}, {"name": "l1", "strength": 1e-4}, {"name": "max_norm", "max_norm": 2.0},
              {"name": "decoupled_decay", "weight_decay": 1e-2}, {"name": "grad_clip", "max_norm": 0.5},
              {"name": "ema", "decay": 0.9}]
stacks = {
    "plain": [{}],
    "dropout + l2": [{"regularizers": [{"name": "dropout", "p": 0.2}, {"name": "l2", "strength": s}]}
                     for s in (1e-3, 1e-2)],
    "all built-ins": [{"regularizers": everything, "optimizer": {"name": "adamw", "lr": 1e-3}, "seed": s}
                      for s in (1, 2, 3)],
    "skipped steps": [{"regularizers": [{"name": "inf_gradients", "when": w}, {"name": "grad_clip"}], "seed": 5}
                      for w in (0, 1, 2)],
    "nan blamed": [{"regularizers": [{"name": "nan_penalty", "at_step": a}], "seed": 7} for a in (3, 10**9, 25)],
    "inf diverges": [{"regularizers": [{"name": "inf_penalty", "at_step": a}], "seed": 8} for a in (4, 10**9)],
    "sgd + cosine": [{"optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
                      "schedule": {"name": "cosine"}, "seed": s} for s in (1, 2)],
    "plateau": [{"schedule": {"name": "plateau", "patience": 0}, "epochs": 3}],
    "step": [{"schedule": {"name": "step", "step_size": 1, "gamma": 0.5},
              "regularizers": [{"name": "l2", "strength": 1e-3}]}],
}
out = {}
for name, variants in stacks.items():
    trainer = Trainer([config(reg, **{**base, **v}) for v in variants], synthetic_splits(), reg, device="cpu")
    results = trainer.fit()
    digest = hashlib.sha256()
    for p in trainer.params.values():
        digest.update(p.detach().numpy().tobytes())
    records = []
    for r in results:
        d = r.to_dict()
        d["epochs"] = [{k: v for k, v in m.items() if k != "epoch_s"} for m in d["epochs"]]
        d["final"] = {k: v for k, v in d["final"].items() if k != "train_s"}
        records.append(d)
    out[name] = {"params": digest.hexdigest()[:16], "results": json.dumps(records, sort_keys=True),
                 "outcomes": [str(d["outcome"]) for d in records], "steps": trainer.step_count}
print(json.dumps(out))
'''


def train(worktree: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", TRAIN], cwd=worktree, env=side_env(worktree), capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"training in {worktree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", help="a git revision")
    p.add_argument("after", nargs="?", default=WORKTREE, help=f"a git revision, or {WORKTREE} (default)")
    args = p.parse_args(argv)
    sides = {"before": describe(args.before), "after": describe(args.after)}
    numbers = {}
    with tempfile.TemporaryDirectory(prefix="l2c-same-") as tmp:
        for side, info in sides.items():
            worktree = Path(tmp) / side
            add_worktree(info["commit"], worktree)
            try:
                numbers[side] = train(worktree)
            finally:
                remove_worktree(worktree)
    print(f"BEFORE {sides['before']['short']}: {sides['before']['subject']}")
    print(f"AFTER  {sides['after']['short']}: {sides['after']['subject']}")
    print(f"{'stack':<16}{'params (sha256)':<20}{'outcomes':<40}equal")
    same = True
    for name, before in numbers["before"].items():
        after = numbers["after"].get(name)
        equal = after == before
        same &= equal
        print(f"{name:<16}{before['params']:<20}{' '.join(before['outcomes']):<40}{'yes' if equal else 'NO'}")
    print("every stack trains to the same numbers" if same else "the numbers differ: the change altered training")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
