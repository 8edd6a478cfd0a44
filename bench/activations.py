"""Why lmforge computes GPT-2's GELU itself on the CPU: torch's ``F.gelu(approximate="tanh")`` forward and
backward against ``lmforge.kernels.gelu_tanh``, with torch's ``tanh`` and ``sigmoid`` alone for scale, on
one MLP activation of the char training-step config (batch 12 x block 64 rows, 4 x 128 columns).

    python -m bench.activations [--threads N] [--rows 768] [--cols 512] [--rounds 7]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .common import interleave, machine, set_threads, table


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    from lmforge.kernels import gelu_tanh, kernel_available

    threads = set_threads(args.threads)
    print(f"machine: {machine()}")
    if not kernel_available():
        raise SystemExit("lmforge's CPU kernels could not be built here (no C compiler?)")
    torch.manual_seed(0)
    x, g = torch.randn(args.rows, args.cols), torch.randn(args.rows, args.cols)
    reps = 20

    def many(fn):
        def run():
            for _ in range(reps):
                fn()
        return run

    def backward(gelu):
        def run():
            xx = x.clone().requires_grad_()
            gelu(xx).backward(g)
        return run

    fns = {"torch.tanh": many(lambda: torch.tanh(x)), "torch.sigmoid": many(lambda: torch.sigmoid(x)),
           "F.gelu tanh, forward": many(lambda: F.gelu(x, approximate="tanh")),
           "lmforge gelu_tanh, forward": many(lambda: gelu_tanh(x)),
           "F.gelu tanh, forward + backward": many(backward(lambda t: F.gelu(t, approximate="tanh"))),
           "lmforge gelu_tanh, forward + backward": many(backward(gelu_tanh))}
    t = interleave(fns, rounds=args.rounds)
    n = x.numel()
    rows = [[k, f"{v / reps * 1e6:.0f}", f"{v / reps / n * 1e9:.2f}"] for k, v in t.items()]
    for a, b in (("F.gelu tanh, forward", "lmforge gelu_tanh, forward"),
                 ("F.gelu tanh, forward + backward", "lmforge gelu_tanh, forward + backward")):
        rows.append([f"{b} vs {a}", "", f"{t[a] / t[b]:.2f}x faster"])
    table(f"GELU on a {args.rows}x{args.cols} fp32 activation, {threads} threads",
          ["what", "us per call", "ns per element"], rows)
    return rows


if __name__ == "__main__":
    main()
