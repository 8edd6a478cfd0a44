"""The CPU benchmark suite, one command: ``python -m bench`` (bench/run_cpu.sh wraps it).

    python -m bench [--threads N] [--only train,ttq,decode,prepare] [--nanogpt DIR] [--pairs K] [--prepare-mb MB]

Runs, in order: the training step (bench/train_step.py), time to quality (bench/time_to_quality.py; its
recipe's model then serves the int8 perplexity check), decoding and int8 (bench/decode.py) and data
preparation (bench/prepare_speed.py). Each part prints its table of ratios with its baseline; the machine,
thread count and load average are printed first and last.
"""
from __future__ import annotations

import argparse
import tempfile
import time

from . import decode, prepare_speed, time_to_quality, train_step
from .common import machine, set_threads


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores, or 1 on a busy machine)")
    ap.add_argument("--only", default="train,ttq,decode,prepare")
    ap.add_argument("--nanogpt", help="a karpathy/nanoGPT checkout: also run its train.py side by side")
    ap.add_argument("--pairs", type=int, default=1, help="time-to-quality baseline/recipe pairs")
    ap.add_argument("--prepare-mb", type=int, default=64)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    parts = set(args.only.split(","))
    t0 = time.perf_counter()
    print(f"# lmforge CPU benchmark suite\nmachine: {machine()}\nthreads: {threads}\n", flush=True)
    th = ["--threads", str(threads)]
    if "train" in parts:
        train_step.main(th)
    ppl = []
    if "ttq" in parts:
        keep = tempfile.mkdtemp(prefix="lmforge-suite-")
        ttq = ["--pairs", str(args.pairs), "--keep", keep] + th
        time_to_quality.main(ttq + (["--nanogpt", args.nanogpt] if args.nanogpt else []))
        ppl = ["--ppl-model", f"{keep}/recipe/final", "--ppl-data", f"{keep}/data"]
    if "decode" in parts:
        decode.main(th + ppl)
    if "prepare" in parts:
        prepare_speed.main(["--mb", str(args.prepare_mb)])
    print(f"\nsuite done in {time.perf_counter() - t0:.0f} s; machine at the end: {machine()}")


if __name__ == "__main__":
    main()
