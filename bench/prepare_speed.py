"""Data preparation: `lmforge prepare` with byte-level BPE, MB/s of English text per core and peak memory.

    python -m bench.prepare_speed [--mb 64] [--workers 1] [--vocab 8192]
                                  [--corpus synthetic|docstrings|FILE]

The default corpus is synthetic English: tinyshakespeare's lines shuffled and repeated (with line-level
variation) to ``--mb`` MB. Such text repeats few distinct words, which flatters lmforge's BPE encoder (it
caches the ids of each whitespace-delimited unit), so ``--corpus docstrings`` runs on real English without
repetition (every docstring of the Python standard library, about 20 MB), and ``--corpus FILE`` on a text
file of your own; ``--mb`` is ignored for both. The command itself (``python -m lmforge prepare``) runs in
a child process, as a user runs it. Throughput per core is input MB divided by the CPU seconds of that process and its tokenizer workers
(CPU time rather than wall time, because the machine may be shared); the wall-clock rate is printed too.
Memory is sampled every 0.2 s over the whole process tree: the peak of the summed RSS (which counts pages
that the forked workers share with their parent once per process, so it over-states) and the peak of the
summed PSS (proportional set size: shared pages split between the processes sharing them; what the tree
really occupies). Prepare streams (bounded work in flight), so memory does not grow with the corpus: run
with --mb 500 for the 500 MB case.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
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


def docstring_corpus(path: Path) -> int:
    """Every distinct module, class and function docstring under the standard library, as documents."""
    import ast
    import sysconfig

    seen: set[str] = set()
    with open(path, "w", encoding="utf-8") as f:
        for src in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            try:
                tree = ast.parse(src.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and doc not in seen:
                        seen.add(doc)
                        f.write(doc.strip() + "\n\n")
    return path.stat().st_size


def children_cpu_seconds() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


class TreeMemory:
    """Peak summed RSS and PSS (MiB) of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.2):
        try:
            import psutil
        except ImportError:
            raise SystemExit("bench.prepare_speed samples memory with psutil: pip install psutil") from None

        self.root = psutil.Process(pid)
        self.rss = self.pss = 0.0
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            rss = pss = 0
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                break
            for p in procs:
                try:
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
                except psutil.Error:
                    pass
            self.rss, self.pss = max(self.rss, rss / 2**20), max(self.pss, pss / 2**20)
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def tokenizer_alone(tok_dir: Path, corpus: Path, mb: int = 32) -> tuple[float, float]:
    """MB/s per CPU-second of encoding the corpus's first ``mb`` MB in the pieces prepare hands the
    tokenizer (``prepare.ENCODE_PIECE_CHARS``), nothing else: (lmforge's encoder, starting with an empty
    unit cache; HF ``tokenizers``' own pipeline, which gives the same ids)."""
    from lmforge.data.prepare import ENCODE_PIECE_CHARS
    from lmforge.tokenizer import Tokenizer

    with open(corpus, encoding="utf-8") as f:
        text = f.read(mb * 1_000_000)
    pieces = [text[i:i + ENCODE_PIECE_CHARS] for i in range(0, len(text), ENCODE_PIECE_CHARS)]
    nbytes = len(text.encode("utf-8"))
    rates = []
    for encode in ("_encode_arrays", "_encode_hf"):  # what prepare calls; the library alone
        tok = Tokenizer.load(tok_dir)
        me = resource.getrusage(resource.RUSAGE_SELF)
        c0 = me.ru_utime + me.ru_stime
        for i in range(0, len(pieces), 64):  # prepare's work items hold about 1 MB
            getattr(tok, encode)(pieces[i:i + 64])
        me = resource.getrusage(resource.RUSAGE_SELF)
        rates.append(nbytes / 1e6 / (me.ru_utime + me.ru_stime - c0))
    return rates[0], rates[1]


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--corpus", default="synthetic",
                    help="synthetic (repeated tinyshakespeare lines), docstrings (real English), or a text file")
    args = ap.parse_args(argv)
    from lmforge.tokenizer import Tokenizer

    print(f"machine: {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-prep-"))
    try:
        corpus = tmp / "corpus.txt"
        if args.corpus == "synthetic":
            nbytes, name = synth_corpus(corpus, args.mb), f"{args.mb} MB synthetic English"
            train_text = DATA_TEXT.read_text(encoding="utf-8")
        else:
            if args.corpus == "docstrings":
                nbytes, name = docstring_corpus(corpus), "Python standard library docstrings"
            else:
                shutil.copyfile(args.corpus, corpus)
                nbytes, name = corpus.stat().st_size, Path(args.corpus).name
            with open(corpus, encoding="utf-8") as f:
                train_text = f.read(4_000_000)  # the tokenizer is trained on the first 4 MB
        Tokenizer.train_from_iterator([train_text], kind="bpe", vocab_size=args.vocab).save(tmp / "tok")
        cmd = [sys.executable, "-m", "lmforge", "prepare", "--input", str(corpus), "--tokenizer", str(tmp / "tok"),
               "--out", str(tmp / "data"), "--workers", str(args.workers)]
        c0, t0 = children_cpu_seconds(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        mem = TreeMemory(proc.pid)
        out, _ = proc.communicate()
        mem.stop()
        cpu, wall = children_cpu_seconds() - c0, time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"prepare failed ({proc.returncode}):\n{out[-3000:]}")
        meta = json.loads((tmp / "data" / "meta.json").read_text(encoding="utf-8"))
        ours, library = tokenizer_alone(tmp / "tok", corpus)
        tokens = sum(s["tokens"] for s in meta["splits"].values())
        per_core = nbytes / 1e6 / cpu
        rows = [["BPE prepare, MB/s per core (CPU time)", f"{per_core:.1f}", verdict(per_core, 5.0)],
                ["BPE prepare, MB/s wall clock",
                 f"{nbytes / 1e6 / wall:.1f} ({args.workers or os.cpu_count()} workers)", ""],
                [f"peak memory, {nbytes / 1e6:.0f} MB corpus, process tree PSS", f"{mem.pss:.0f} MiB",
                 verdict(mem.pss, 1024, higher_is_better=False)],
                ["peak memory, process tree RSS summed (shared pages counted per process)", f"{mem.rss:.0f} MiB",
                 verdict(mem.rss, 1024, higher_is_better=False)],
                ["lmforge's encoder alone, in process (first 32 MB, the same 16 KB pieces), MB/s per core",
                 f"{ours:.1f}", ""],
                ["HF tokenizers' pipeline alone (the same ids), MB/s per core", f"{library:.1f}",
                 f"lmforge {ours / library:.2f}x"],
                ["tokens", f"{tokens:,} ({nbytes / tokens:.2f} bytes/token)", ""]]
        table(f"Data preparation (byte-level BPE, vocab {args.vocab}, {name})",
              ["what", "measured", "target"], rows)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
