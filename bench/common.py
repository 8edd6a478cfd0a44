"""Shared helpers for the benchmark scripts: interleaved timing, hardware baselines measured in the same
run (matmul peak, streaming memory bandwidth), machine description and table printing.

Rules every script follows (docs/benchmarks.md): each figure is a ratio against a baseline measured in the
same process, candidates run interleaved (A, B, A, B, ...) and the median of the rounds is reported, and
torch.set_num_threads is fixed, because the machines these run on are shared and noisy.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, load average {load_average()}")


def set_threads(n: int, tune_malloc: bool = True) -> int:
    """Fix torch's thread count for the whole run: ``n``, or by default every core (at most 8) on a quiet
    machine and 1 on a machine already busier than its core count (a thread team waiting at barriers
    for descheduled members runs up to 10x slower than one thread there). ``tune_malloc``: apply
    lmforge's allocator setting (below) for the whole run."""
    if not n:
        cores = os.cpu_count() or 1
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= cores
        n = 1 if busy else min(cores, 8)
    torch.set_num_threads(n)
    # lmforge's training loop keeps freed memory for reuse (lmforge.train.memory); it is process-wide, so
    # set it from the start: every candidate of a run then allocates under the same rules.
    if tune_malloc:
        from lmforge.train.memory import keep_freed_memory

        keep_freed_memory()
    return n


def interleave(fns: dict[str, Callable[[], None]], rounds: int, reps: int = 1, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed in rounds A, B, C, A, B, C, ... (the order is
    rotated every round, so no candidate always follows the same one)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            for _ in range(reps):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_peak_flops(n: int = 1024, rounds: int = 5) -> float:
    """fp32 matmul FLOP/s of this process's threads (an n x n x n GEMM, best of a few rounds)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=c)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best


def stream_bandwidth(mbytes: int = 512, rounds: int = 5) -> float:
    """Streaming memory bandwidth in bytes/s, counted as bytes read (a sum over a buffer far larger than the
    caches, as decoding reads weights: read-only). Best of a few rounds, over ordinary memory and over memory
    advised for huge pages (where lmforge puts decoding weights), so the bound is the stricter of the two."""
    from lmforge.kernels import hugepage_empty

    numel = mbytes * (1 << 20) // 4
    best = float("inf")
    for x in (torch.ones(numel), hugepage_empty(numel).fill_(1.0)):
        x.sum()
        for _ in range(rounds):
            t0 = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t0)
        del x
    return numel * 4 / best


def table(title: str, header: list[str], rows: list[list], out=None) -> str:
    """Print (and return) a Markdown table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [f"\n### {title}\n"] if title else []
    lines.append("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(cells[0])) + " |")
    lines.append("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |")
    text = "\n".join(lines)
    print(text, file=out or sys.stdout, flush=True)
    return text


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return ("met" if ok else "NOT met") + f" (target {'>=' if higher_is_better else '<='} {target:g})"
