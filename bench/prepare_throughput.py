"""Throughput of `lmforge prepare` (byte-level BPE): wall-clock MB/s and MB per CPU-second per core.

    python bench/prepare_throughput.py [--input FILE ...] [--tokenizer DIR] [--workers N] [--repeat K]

Defaults: the quickstart corpus (Shakespeare's complete works, fetched once) repeated --repeat times, and an
8192-token BPE trained on it. CPU time is reported besides wall time because shared machines are noisy.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from lmforge.config import PrepareConfig
from lmforge.data.corpora import default_corpus
from lmforge.data.prepare import prepare
from lmforge.tokenizer import Tokenizer


def cpu_seconds() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="*")
    ap.add_argument("--tokenizer")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=10, help="copies of the default corpus (about 5 MB each)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = args.input
        if not inputs:
            path, about = default_corpus()
            print(about)
            text = Path(path).read_text(encoding="utf-8")
            big = Path(tmp) / "corpus.txt"
            with open(big, "w", encoding="utf-8") as f:
                for _ in range(args.repeat):
                    f.write(text)
            inputs = [str(big)]
        tok_dir = args.tokenizer
        if not tok_dir:
            tok_dir = str(Path(tmp) / "tok")
            sample = Path(inputs[0]).read_text(encoding="utf-8", errors="replace")[:20_000_000]
            Tokenizer.train_from_iterator([sample], kind="bpe", vocab_size=8192).save(tok_dir)
        s0, c0 = cpu_seconds()
        t0 = time.perf_counter()
        meta = prepare(PrepareConfig(input=inputs, tokenizer=tok_dir, out=str(Path(tmp) / "data"),
                                     workers=args.workers), progress=True)
        wall = time.perf_counter() - t0
        s1, c1 = cpu_seconds()
    st = meta["stats"]
    mb = st["input_bytes"] / 1e6
    cpu = (s1 - s0) + (c1 - c0)
    print(f"{mb:.1f} MB -> {st['tokens']:,} tokens with {st['workers']} worker(s): {mb / wall:.2f} MB/s wall, "
          f"{mb / cpu:.2f} MB per CPU-second (parent {s1 - s0:.1f} s, workers {c1 - c0:.1f} s)")


if __name__ == "__main__":
    main()
