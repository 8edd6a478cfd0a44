"""Data preparation: `lmforge prepare` with byte-level BPE, MB/s of English text per core and peak RSS.

    python -m bench.prepare_speed [--mb 64] [--workers 1] [--vocab 8192]

The corpus is synthetic English: tinyshakespeare's lines shuffled and repeated (with line-level variation)
to ``--mb`` MB. Throughput per core is input MB divided by the CPU seconds of the prepare process and its
tokenizer workers (CPU time rather than wall time, because the machine is shared); the wall-clock rate is
printed too. Peak RSS is the largest resident set of the parent and of any one worker (ru_maxrss), and
their sum bounds the total. Prepare streams (bounded work in flight), so RSS does not grow with the
corpus: run with --mb 500 for the 500 MB case.
"""
from __future__ import annotations

import argparse
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

from .common import DATA_TEXT, machine, table, verdict


def synth_corpus(path: Path, mb: int, seed: int = 0) -> int:
    lines = [ln for ln in DATA_TEXT.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rng = random.Random(seed)
    target = mb * 1_000_000
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(lines)
            block = "\n".join(ln if rng.random() > 0.1 else ln.lower() for ln in lines[:2000]) + "\n\n"
            f.write(block)
            written += len(block.encode("utf-8"))
    return path.stat().st_size


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args(argv)
    from lmforge.config import PrepareConfig
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import Tokenizer

    print(f"machine: {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-prep-"))
    try:
        corpus = tmp / "corpus.txt"
        nbytes = synth_corpus(corpus, args.mb)
        Tokenizer.train_from_iterator([DATA_TEXT.read_text(encoding="utf-8")], kind="bpe",
                                      vocab_size=args.vocab).save(tmp / "tok")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        c0, t0 = cpu_seconds(), time.perf_counter()
        meta = prepare(PrepareConfig(input=[str(corpus)], tokenizer=str(tmp / "tok"), out=str(tmp / "data"),
                                     workers=args.workers), progress=False)
        cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
        rss_parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
        rss_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        rss_total = rss_parent + rss_child * max(1, meta["stats"]["workers"] if args.workers != 1 else 0)
        per_core = nbytes / 1e6 / cpu
        rows = [["BPE prepare, MB/s per core (CPU time)", f"{per_core:.1f}", verdict(per_core, 5.0)],
                ["BPE prepare, MB/s wall clock", f"{nbytes / 1e6 / wall:.1f} ({meta['stats']['workers']} workers)", ""],
                [f"peak RSS, {nbytes / 1e6:.0f} MB corpus (parent + workers)", f"{rss_total:.0f} MiB",
                 verdict(rss_total, 1024, higher_is_better=False)],
                ["tokens", f"{meta['stats']['tokens']:,} ({nbytes / meta['stats']['tokens']:.2f} bytes/token)", ""]]
        del rss0
        table(f"Data preparation (byte-level BPE, vocab {args.vocab}, {args.mb} MB synthetic English)",
              ["what", "measured", "target"], rows)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
