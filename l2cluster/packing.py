"""Packing: which jobs may train together as one stacked model (a pack), and how many members a pack may have.

A pack is K jobs trained as one `Trainer(configs)` on one gang: one set of kernels, K sets of parameters. Jobs
may share a pack when their configs differ only in seed and numeric regularizer settings (the trainer's
stacking rule), they ask for the same gang, and none opted out (`scaling.pack: false`). Every member stays a
job of its own: its own row, metrics, result and outcome.

Plain Python (no torch, no ray): the coordinator packs from keys stored at submission, the in-process `train`
command from the same keys, so both pack the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

# On a CPU (one torch thread per rank) a pack of 16 costs ~0.76x per job what one job alone does, and larger
# packs gain nothing more while their memory grows (bench/pack_cost.py, reference model; see docs/benchmarks.md).
CPU_DEFAULT_MAX_PACK = 16
# On a GPU the cost per job falls with K until the GPU is busy: on an H100 (reference model, CUDA graphs) 0.257 s
# per model-epoch alone, 0.036 at K=32, 0.027 at K=256 and 0.028 at K=1024 with 4x the memory (bench/pack_cost.py).
# The memory estimate below lowers it further for large models.
GPU_DEFAULT_MAX_PACK = 256
# Memory a pack may plan to use of a GPU's total (the rest: CUDA context, allocator slack, the data set).
_GPU_MEMORY_SHARE = 0.5
# Assumed GPU memory before any gang of a shape has reported its device (the first pack of a new shape).
ASSUMED_GPU_BYTES = 16 * 2**30


def stack_key(config: dict) -> str:
    """Equal keys: the configs can be trained stacked. Drops the seed, numeric regularizer settings and what
    does not change a job's computation (max_attempts is kept: a pack's members share their retries)."""
    d = json.loads(json.dumps(config))  # a deep copy of plain JSON values
    d.pop("seed", None)
    d.get("scaling", {}).pop("pack", None)
    d["regularizers"] = [{k: v for k, v in r.items() if k == "name" or not _numeric(v)}
                         for r in d.get("regularizers", [])]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def pack_key(config: dict) -> str | None:
    """The key under which the daemon packs a job; None when it always trains alone: it opted out
    (`scaling.pack: false`) or it follows a plateau schedule (one model's validation loss drives its lr)."""
    if not config.get("scaling", {}).get("pack", True):
        return None
    if config.get("schedule", {}).get("name") == "plateau":
        return None
    return stack_key(config)


def _numeric(v: Any) -> bool:
    is_num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    return is_num(v) or (isinstance(v, list) and bool(v) and all(is_num(x) for x in v))


def member_bytes(config: dict) -> int:
    """A generous estimate of the device memory one pack member needs: its parameters with their gradients,
    Adam's two moments, the epoch-start copy kept to blame a plugin for NaNs and a skip mask's copy (8 copies),
    and a training step's activations (forward, masks, gradients: ~6 per unit). The data set is shared by the
    pack and evaluation runs in chunks sized by K, so neither grows with K."""
    model = config.get("model", {})
    sizes = [784, *model.get("hidden_sizes", [512, 256, 128]), 10]
    num_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    itemsize = 8 if model.get("dtype") == "float64" else 4
    batch = config.get("data", {}).get("batch_size", 64)
    return itemsize * (8 * num_params + 6 * batch * sum(sizes[1:]))


def max_members(config: dict, *, gpu_bytes: int | None, cap: int | None = None) -> int:
    """How many members a pack of this config may have: on a GPU (gpu_bytes, the smallest of the gang's GPUs)
    what half of its memory holds, at most GPU_DEFAULT_MAX_PACK; on a CPU (gpu_bytes None)
    CPU_DEFAULT_MAX_PACK. `cap` (the daemon's --max-pack) lowers either, or raises the CPU default."""
    if gpu_bytes is None:
        return max(1, cap if cap is not None else CPU_DEFAULT_MAX_PACK)
    fits = int(gpu_bytes * _GPU_MEMORY_SHARE // max(1, member_bytes(config)))
    k = min(GPU_DEFAULT_MAX_PACK, fits)
    return max(1, min(k, cap) if cap is not None else k)


def group_into_packs(items: Sequence[T], limit: int | Callable[[T], int], key: Callable[[T], Any]) -> list[list[T]]:
    """All of `items` as packs, in order of their first member: each joins the open pack of its key until that has
    `limit` members (a number, or a function of the pack's first member); a key of None trains alone. What `train`
    runs one pack after another, and how the coordinator packs its queue."""
    limit_of = limit if callable(limit) else (lambda _: limit)
    packs: list[list[T]] = []
    open_packs: dict[Any, tuple[list[T], int]] = {}  # key → its open pack and that pack's size limit
    for item in items:
        k = key(item)
        if k is None:
            packs.append([item])
            continue
        pack, size = open_packs.get(k, ([], 0))
        if not pack or len(pack) >= size:
            pack, size = [], limit_of(item)
            packs.append(pack)
            if size > 1:
                open_packs[k] = (pack, size)
        pack.append(item)
    return packs
