"""Why lmforge computes GPT-2's GELU and causal attention itself on the CPU in training.

GELU: torch's ``F.gelu(approximate="tanh")`` forward and backward against ``lmforge.kernels.gelu_tanh``,
with torch's ``tanh`` and ``sigmoid`` alone for scale, on one MLP activation of the char training-step
config (batch 12 x block 64 rows, 4 x 128 columns).
Attention: ``F.scaled_dot_product_attention(is_causal=True)`` forward and backward against lmforge's kernel
(``lmforge.kernels.causal_attention``) for B x H x T x D shapes: the char config's, the 124M training-step
config's, nanoGPT's GPU char model's (6 heads of 64 over 256 positions), and longer blocks up to where the
kernel stops paying (``MAX_ATTENTION_TD``; a shape past it is timed all the same).
Weight gradient of a linear layer, dW = g^T x for N tokens (x [N, in], g [N, out]): MKL's product (torch's
mm) against oneDNN's inner product with the gradient transposed into a buffer of its own, transposed by
torch's copy or by lmforge's kernel (``lmforge.kernels.transpose``), for GPT-2 124M's four layer shapes at
the 124M training-step config's 512 tokens.

    python -m bench.activations [--threads N] [--rows 768] [--cols 512] [--rounds 7]
                                [--attention 12x4x64x32 4x12x128x64 12x6x256x64 1x12x1024x64 1x4x4096x64]
                                [--weight-grad 512x768x2304 512x768x768 512x768x3072 512x3072x768]
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
    ap.add_argument("--attention", nargs="*", default=["12x4x64x32", "4x12x128x64", "12x6x256x64", "1x12x1024x64",
                                                       "1x4x4096x64"],
                    help="B x H x T x D shapes of causal attention to time (none: skip)")
    ap.add_argument("--weight-grad", nargs="*", default=["512x768x2304", "512x768x768", "512x768x3072", "512x3072x768"],
                    help="N x in x out shapes of a linear layer's weight gradient to time (none: skip)")
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
    if args.attention:
        rows += attention_rows(args.attention, args.rounds, threads)
    if args.weight_grad:
        rows += weight_grad_rows(args.weight_grad, args.rounds, threads)
    return rows


def weight_grad_rows(shapes: list[str], rounds: int, threads: int) -> list[list]:
    """dW = g^T x three ways, interleaved per shape; GFLOP/s from 2 N in out flops per product."""
    from lmforge.kernels import _onednn, onednn_linear_available, transpose

    if not onednn_linear_available():
        print("weight gradient: this torch has no oneDNN linear; skipped")
        return []
    rows = []
    for shape in shapes:
        n, d_in, d_out = (int(v) for v in shape.lower().split("x"))
        x, g = torch.randn(n, d_in), torch.randn(n, d_out)
        dw = torch.empty(d_out, d_in)
        reps = max(1, min(50, 400_000_000 // (n * d_in * d_out + 1)))

        def many(fn):
            def run():
                for _ in range(reps):
                    fn()
            return run

        fns = {"mkl": many(lambda: torch.mm(g.t(), x, out=dw)),
               "dnn, torch T": many(lambda: _onednn(g.t().contiguous(), x.t())),
               "dnn, lmforge T": many(lambda: _onednn(transpose(g), x.t())),
               "torch T": many(lambda: g.t().contiguous()), "lmforge T": many(lambda: transpose(g))}
        t = {k: v / reps for k, v in interleave(fns, rounds=rounds).items()}
        flops = 2 * n * d_in * d_out
        rows.append([shape] + [f"{t[k] * 1e3:.2f} ms ({flops / t[k] / 1e9:.0f})" for k in ("mkl", "dnn, torch T",
                                                                                       "dnn, lmforge T")]
                    + [f"{t[k] * 1e3:.3f} ms" for k in ("torch T", "lmforge T")]
                    + [f"{t['mkl'] / t['dnn, lmforge T']:.2f}x"])
    table(f"Linear weight gradient dW = g^T x, fp32, {threads} threads (GFLOP/s in brackets)",
          ["N x in x out", "MKL mm", "oneDNN, torch's transpose", "oneDNN, lmforge's transpose",
           "torch's transpose", "lmforge's transpose", "oneDNN + lmforge's transpose vs MKL"], rows)
    return rows


def attention_rows(shapes: list[str], rounds: int, threads: int) -> list[list]:
    """Causal attention, forward + backward, on [B, H, T, D] views of one fused q/k/v projection (the
    layout the model gives it): torch's SDPA against lmforge's kernel, interleaved per shape."""
    from lmforge.kernels import _CausalAttention, attention_applies

    rows = []
    for shape in shapes:
        B, H, T, D = (int(v) for v in shape.lower().split("x"))
        if D % 16:
            raise SystemExit(f"{shape}: the kernel needs a head width that is a multiple of 16")
        qkv = torch.randn(B, T, 3, H, D)
        g = torch.randn(B, H, T, D)
        reps = max(1, min(50, 2_000_000 // (B * H * T * T * D // 64 + 1)))

        def step(fn):
            def run():
                for _ in range(reps):
                    leaf = qkv.clone().requires_grad_()
                    fn(*(leaf[:, :, i].transpose(1, 2) for i in range(3))).backward(g)
            return run

        t = interleave({"sdpa": step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                        "kernel": step(_CausalAttention.apply)}, rounds=rounds)
        views = [qkv[:, :, i].transpose(1, 2) for i in range(3)]
        note = "" if attention_applies(*views) else " (the kernel does not take it: SDPA is used)"
        rows.append([f"{B}x{H}x{T}x{D}{note}", f"{t['sdpa'] / reps * 1e6:.0f}", f"{t['kernel'] / reps * 1e6:.0f}",
                     f"{t['sdpa'] / t['kernel']:.2f}x"])
    table(f"Causal attention forward + backward, fp32, {threads} threads",
          ["B x H x T x D", "SDPA us", "lmforge kernel us", "kernel speed-up"], rows)
    return rows


if __name__ == "__main__":
    main()
