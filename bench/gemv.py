"""Why lmforge lays out fp32 linear layers for CPU decoding: the streaming rate of one-row (and eight-row)
products with GPT-2-124M's matrices, torch's default ``F.linear`` against oneDNN's packed inner product
(``lmforge.packed.PackedLinear``, the fallback) and lmforge's own kernel on weights in huge pages
(``lmforge.packed.StreamLinear``, the default where it builds), next to the read bandwidth measured in the
same run.

    python -m bench.gemv [--threads N] [--rounds 5] [--rows 1 8]

Each matrix shape is streamed as 12 distinct matrices (the 12 blocks of GPT-2 small; the 50257-row output
head once), so what is timed is memory traffic, not cache reuse. GB/s = weight bytes / seconds.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from .common import interleave, machine, set_threads, stream_bandwidth, table

SHAPES = {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072), "head": (50257, 768)}


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--scale", type=float, default=1.0, help="shrink the shapes (smoke tests)")
    args = ap.parse_args(argv)
    from lmforge.kernels import kernel_available
    from lmforge.packed import PackedLinear, StreamLinear, pack_linears, packing_available

    threads = set_threads(args.threads)
    print(f"machine: {machine()}")
    if not packing_available():
        raise SystemExit("this torch build has no oneDNN fp32 inner product")
    torch.manual_seed(0)
    rows_out = []
    bandwidth = stream_bandwidth(max(8, int(512 * args.scale)), rounds=3)
    for name, (n, k) in SHAPES.items():
        n, k = max(8, int(n * args.scale)), max(8, int(k * args.scale))
        count = 1 if name == "head" else 12
        plain = [nn.Linear(k, n, bias=False).eval() for _ in range(count)]
        packed = [PackedLinear(m) for m in plain]
        stream = nn.ModuleList([nn.Linear(k, n, bias=False) for _ in range(count)])
        if kernel_available():
            stream.load_state_dict(nn.ModuleList(plain).state_dict())
            pack_linears(stream)  # StreamLinear, weights moved into huge pages
            assert all(type(m) is StreamLinear for m in stream)
        nbytes = count * n * k * 4
        for rows in args.rows:
            x = torch.randn(rows, k)

            def run(layers):
                with torch.inference_mode():
                    for m in layers:
                        m(x)

            fns = {"F.linear": lambda: run(plain), "packed": lambda: run(packed)}
            if kernel_available():
                fns["kernel"] = lambda: run(stream)
            t = interleave(fns, rounds=args.rounds)
            a, b = nbytes / t["F.linear"] / 1e9, nbytes / t["packed"] / 1e9
            c = nbytes / t["kernel"] / 1e9 if "kernel" in t else float("nan")
            rows_out.append([f"{name} {n}x{k}" + ("" if count == 1 else f" (x{count})"), rows, f"{a:.1f}",
                             f"{b:.1f}", f"{c:.1f}", f"{c / a:.2f}x"])
    table(f"Linear layers, fp32, {threads} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s (sum over "
          f"{max(8, int(512 * args.scale))} MB)",
          ["matrix", "rows", "F.linear GB/s", "oneDNN packed GB/s", "lmforge kernel GB/s", "kernel / F.linear"],
          rows_out)
    return rows_out


if __name__ == "__main__":
    main()
