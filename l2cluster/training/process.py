"""Set-up of a process that trains: done once, at process start (a gang's rank, `l2cluster train`), not by the
trainer, which also runs inside other people's processes (tests, notebooks, a plugin author's check)."""

from __future__ import annotations

import ctypes
import sys

import torch

_MALLOC_TUNED: bool | None = None


def prepare_training_process(num_threads: int | None = None) -> None:
    """Pin torch to `num_threads` CPU threads (oversubscribed CPU workers were measured 25x slower) and keep freed
    memory (keep_freed_memory)."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed large blocks back to the OS (Linux only; once per process).

    Every CPU step allocates and frees megabytes of temporaries (activations, gradients). By default glibc
    unmaps or trims them after each free, so the next step page-faults them in again; on the reference MLP
    that made steps with an L2 term and dropout ~1.5x slower. PyTorch's CPU tuning guide suggests jemalloc or
    tcmalloc for the same reason; this is the equivalent that needs no preloading."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        _MALLOC_TUNED = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
                _MALLOC_TUNED = bool(libc.mallopt(m_trim_threshold, 1 << 30)
                                     and libc.mallopt(m_mmap_threshold, 1 << 30))
            except (OSError, AttributeError):  # not glibc (musl, …): leave the allocator alone
                pass
    return _MALLOC_TUNED
