"""Allocator settings for training on the CPU.

A training step frees and re-allocates the same large buffers every step (activations, gradients with
``zero_grad(set_to_none=True)``, the logits). glibc's malloc serves blocks above a threshold (128 KiB to
32 MiB, adapting) with fresh ``mmap`` calls and gives them back with ``munmap``, so every step touches
its memory anew and the kernel zero-fills each page on first touch: for GPT-2 124M at batch 4 x 128,
about 214,000 page faults per step in lmforge's step. Raising the mmap and trim thresholds makes malloc
keep freed memory in the heap and hand it out again, which removes them (0 per step; compare
``python -m bench.train_step --config 124m`` with and without ``--glibc-malloc``).
The cost: the process keeps its peak memory until it exits, which a training process does anyway.

Set LMFORGE_MALLOC_TUNE=0 to leave malloc alone (or use another allocator through LD_PRELOAD).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def keep_freed_memory() -> bool:
    """On Linux with glibc, keep freed blocks for reuse (see the module docstring); True if applied.
    Only the first call acts; it changes the whole process."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("LMFORGE_MALLOC_TUNE", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    big = 2**31 - 1
    # glibc before 2.35 or so caps the mmap threshold at 32 MiB (HEAP_MAX_SIZE / 2 on 64-bit): fall back.
    mmap_ok = bool(mallopt(_M_MMAP_THRESHOLD, big)) or bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20))
    trim_ok = bool(mallopt(_M_TRIM_THRESHOLD, big))
    _done = mmap_ok or trim_ok
    return _done
