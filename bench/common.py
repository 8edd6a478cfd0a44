"""Shared helpers for the benchmark scripts: interleaved timing, hardware baselines measured in the same
run (matmul peak, streaming memory bandwidth), machine description and table printing.

Rules every script follows (docs/benchmarks.md): each figure is a ratio against a baseline measured in the
same process, candidates run interleaved (A, B, A, B, ...) and the median of the rounds is reported, and
torch.set_num_threads is fixed, because the machines these run on are shared and noisy.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

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


def interleave(fns: dict[str, Callable[[], None]], rounds: int, reps: int = 1, warmup: int = 1,
               before: Optional[dict[str, Callable[[], None]]] = None,
               samples: Optional[dict[str, list[float]]] = None) -> dict[str, float]:
    """Median seconds per call of each function, timed in rounds A, B, C, A, B, C, ... (the order is
    rotated every round, so no candidate always follows the same one).

    before: untimed functions run right before each timed round of the candidate of the same name (not
    before the warm-up calls), for a measurement that must be paired with that round, such as the read
    bandwidth on a host whose speed changes within seconds. samples: filled with each candidate's seconds
    per call in every round, in the order of the rounds."""
    before = before or {}
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            if k in before:
                before[k]()
            t0 = time.perf_counter()
            for _ in range(reps):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / reps)
    if samples is not None:
        samples.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def best_seconds(fn: Callable[[], object], rounds: int) -> float:
    """The shortest of ``rounds`` timed calls of ``fn``, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak_flops(n: int = 1024, rounds: int = 5) -> float:
    """fp32 matmul FLOP/s of this process's threads (an n x n x n GEMM, best of a few rounds)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)

    def four():
        for _ in range(4):
            torch.mm(a, b, out=c)

    return 2 * n ** 3 / (best_seconds(four, rounds) / 4)


def fma_peak_flops(rounds: int = 5, iters: int = 4_000_000) -> Optional[float]:
    """fp32 FLOP/s of the vector units alone with this process's threads: independent fused multiply-adds in
    registers, no memory traffic (lmforge's csrc/peak.c), best of a few rounds. What no matmul can exceed;
    None where lmforge's kernels are not available."""
    from lmforge.kernels import load_kernel

    lib = load_kernel()
    if lib is None:
        return None
    flops = lib.lmf_fma_loop(iters)  # the same count every call
    return flops / best_seconds(lambda: lib.lmf_fma_loop(iters), rounds)


def stream_bandwidth(mbytes: int = 512, rounds: int = 5) -> float:
    """Streaming memory bandwidth in bytes/s, counted as bytes read (a sum over a buffer far larger than the
    caches, as decoding reads weights: read-only). Best of a few rounds, over ordinary memory and over memory
    advised for huge pages (where lmforge puts decoding weights), so the bound is the stricter of the two."""
    from lmforge.kernels import hugepage_empty

    numel = mbytes * (1 << 20) // 4
    best = min(best_seconds(x.sum, rounds) for x in (torch.ones(numel), hugepage_empty(numel).fill_(1.0)))
    return numel * 4 / best


def kernel_read_bandwidth(mbytes: int = 512, rounds: int = 5, width: int = 768) -> Optional[float]:
    """Bytes/s at which lmforge's product kernel reads a buffer of ``mbytes`` in huge pages as a matrix
    [mbytes / (4 width), width] against one row: many rows read side by side, which on some hosts draws
    more bandwidth than torch's one-stream-per-thread sum. None where the kernel is not available. Best of
    a few rounds."""
    from lmforge.kernels import hugepage_empty, kernel_available, stream_linear

    if not kernel_available():
        return None
    rows = mbytes * (1 << 20) // (4 * width)
    w = hugepage_empty(rows * width).fill_(1.0).view(rows, width)
    x = torch.ones(1, width)
    with torch.inference_mode():
        return w.numel() * 4 / best_seconds(lambda: stream_linear(x, w), rounds)


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


def shape_arg(base: dict) -> Callable[[str], dict]:
    """An argparse type for ``--shape key=value,...``: ``base`` with some of its integer entries changed, so
    that a benchmark runs on a configuration it does not list (unknown keys and non-integers are refused)."""

    def parse(text: str) -> dict:
        out = dict(base)
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in base:
                raise argparse.ArgumentTypeError(f"{item!r}: expected key=value with key one of {', '.join(base)}")
            try:
                out[key.strip()] = int(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{item!r}: {value!r} is not an integer") from None
            if out[key.strip()] < 1:
                raise argparse.ArgumentTypeError(f"{item!r}: must be at least 1")
        return out

    return parse
