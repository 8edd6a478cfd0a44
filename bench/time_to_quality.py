"""Time to quality on CPU: lmforge's best recipe (configs/shakespeare-char-cpu.yaml) against nanoGPT's
published CPU setup, on tinyshakespeare at character level, in one run.

    python -m bench.time_to_quality [--pairs 1] [--threads N] [--nanogpt DIR] [--recipe FILE.yaml]

Baseline: the plain-PyTorch reference (bench/ref_gpt.py) trained exactly as nanoGPT's README trains its
CPU "baby GPT": char-tiny (4 layers, 4 heads, 128 wide, context 64, no biases, no dropout), batch 12,
2000 steps, AdamW lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, betas 0.9/0.99, weight decay
0.1, clipping at 1.0, random windows of the training split. With ``--nanogpt DIR`` (a checkout of
karpathy/nanoGPT) nanoGPT's own train.py also runs with that README command, data written in its format,
and so does ``lmforge pretrain --config configs/shakespeare-char-nanogpt.yaml`` (the same setting through
lmforge's command line, evaluation every 250 steps included): both as whole processes, side by side.

Candidate: ``lmforge pretrain --config configs/shakespeare-char-cpu.yaml`` (in process; intermediate
validation off, the end-of-run checkpoint included in its time).

Budget: the baseline's wall-clock, training only (model construction to the last optimizer step), measured
in the same run; baseline and recipe alternate ``--pairs`` times. Validation loss, for every model alike:
the mean next-token cross-entropy over all non-overlapping 64-token windows of the validation split (the
last 10% of the text; nanoGPT's estimate is the mean over 200 random batches of the same split).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .common import DATA_TEXT, ROOT, machine, set_threads, table, verdict
from .ref_gpt import RefConfig, RefGPT, ref_optimizer

EVAL_BLOCK = 64


def prepare_char(tmp: Path) -> Path:
    from lmforge.config import PrepareConfig
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import Tokenizer

    Tokenizer.train_from_iterator([DATA_TEXT.read_text(encoding="utf-8")], kind="char").save(tmp / "tok")
    prepare(PrepareConfig(input=[str(DATA_TEXT)], tokenizer=str(tmp / "tok"), out=str(tmp / "data")), progress=False)
    return tmp / "data"


def split_tokens(data: Path, split: str) -> torch.Tensor:
    from lmforge.data.shards import TokenData

    t = TokenData(str(data), split)
    return torch.from_numpy(np.asarray(t.get(0, len(t))).astype(np.int64))


@torch.no_grad()
def val_loss(model, val: torch.Tensor, block: int = EVAL_BLOCK, forward=None) -> float:
    model.eval()
    n = (len(val) - 1) // block
    x, y = val[: n * block].view(n, block), val[1: n * block + 1].view(n, block)
    total = 0.0
    for i in range(0, n, 64):
        logits = model(x[i:i + 64]) if forward is None else forward(model, x[i:i + 64])
        total += F.cross_entropy(logits.float().flatten(0, 1), y[i:i + 64].flatten(), reduction="sum").item()
    return total / (n * block)


def nanogpt_lr(it: int, steps: int = 2000, lr: float = 1e-3, min_lr: float = 1e-4, warmup: int = 100) -> float:
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    ratio = (it - warmup) / (steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (lr - min_lr)


def run_baseline(train: torch.Tensor, vocab: int, steps: int, seed: int) -> tuple[float, RefGPT]:
    torch.manual_seed(seed)
    B, T = 12, 64
    t0 = time.perf_counter()
    model = RefGPT(RefConfig(vocab_size=vocab, block_size=T, n_layers=4, n_heads=4, d_model=128, bias=False))
    opt = ref_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    model.train()
    for it in range(steps):
        for group in opt.param_groups:
            group["lr"] = nanogpt_lr(it, steps)
        ix = torch.randint(len(train) - T - 1, (B,))
        x = torch.stack([train[i:i + T] for i in ix])
        y = torch.stack([train[i + 1:i + 1 + T] for i in ix])
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    return time.perf_counter() - t0, model


def run_recipe(recipe: Path, data: Path, out: Path, threads: int, steps: int = 0):
    from lmforge.checkpoint import load_checkpoint
    from lmforge.cli import pretrain_config_from_args
    from lmforge.train.pretrain import pretrain

    shutil.rmtree(out, ignore_errors=True)
    argv = ["--config", str(recipe), "--data", str(data), "--out", str(out), "--train.eval-every", "0",
            "--train.save-every", "0", "--train.no-progress", "--train.no-plot", "--train.threads", str(threads)]
    if steps:
        argv += ["--train.steps", str(steps)]
    cfg = pretrain_config_from_args(argv)
    t0 = time.perf_counter()
    final = pretrain(cfg, log=lambda *a: None)
    seconds = time.perf_counter() - t0
    model, _, _ = load_checkpoint(final)
    return seconds, model, cfg


def run_nanogpt(repo: Path, steps: int, threads: int) -> tuple[float, float]:
    """nanoGPT's own train.py with its README CPU command; returns (wall seconds, its final val loss)."""
    import pickle

    text = DATA_TEXT.read_text(encoding="utf-8")
    d = repo / "data" / "shakespeare_char"
    if not (d / "train.bin").exists():  # its prepare.py format, written here (its script downloads the text)
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        ids = np.array([stoi[c] for c in text], dtype=np.uint16)
        n = int(len(text) * 0.9)
        ids[:n].tofile(d / "train.bin")
        ids[n:].tofile(d / "val.bin")
        with open(d / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
           "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
           "--n_embd=128", f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--dropout=0.0",
           f"--out_dir={tempfile.mkdtemp(prefix='nanogpt-out-')}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"nanoGPT train.py failed:\n{p.stderr[-2000:]}")
    vals = re.findall(r"val loss ([0-9.]+)", p.stdout)
    return seconds, float(vals[-1]) if vals else float("nan")


def run_lmforge_nanogpt_setting(data: Path, steps: int, threads: int) -> tuple[float, float]:
    """``lmforge pretrain --config configs/shakespeare-char-nanogpt.yaml`` (nanoGPT's README CPU setting, with
    its evaluation every 250 steps and checkpoints) as a user runs it, in a process of its own, to set beside
    nanoGPT's train.py: returns (wall seconds of the whole process, its last validation loss)."""
    out = Path(tempfile.mkdtemp(prefix="lmforge-nanogpt-setting-"))
    try:
        config = ROOT / "configs" / "shakespeare-char-nanogpt.yaml"
        cmd = [sys.executable, "-m", "lmforge", "pretrain", "--config", str(config), "--data", str(data),
               "--out", str(out / "run"), "--train.steps", str(steps), "--train.no-progress", "--train.no-plot",
               "--train.threads", str(threads)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"lmforge pretrain failed:\n{p.stderr[-2000:]}")
        vals = re.findall(r"val loss ([0-9.]+)", p.stdout + p.stderr)
        return seconds, float(vals[-1]) if vals else float("nan")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1, help="baseline/recipe pairs, alternated")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--recipe", default=str(ROOT / "configs" / "shakespeare-char-cpu.yaml"))
    ap.add_argument("--nanogpt", help="a karpathy/nanoGPT checkout to run side by side")
    ap.add_argument("--baseline-steps", type=int, default=2000)
    ap.add_argument("--recipe-steps", type=int, default=0, help="override the recipe's steps (smoke tests)")
    ap.add_argument("--keep", help="directory to keep the data and the recipe's run in (DIR/data, DIR/recipe/final)")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lmforge-ttq-"))
    tmp.mkdir(parents=True, exist_ok=True)
    data = prepare_char(tmp)
    train, val = split_tokens(data, "train"), split_tokens(data, "val")
    vocab = int(max(train.max(), val.max())) + 1
    print(f"machine: {machine()}")
    base_s, base_l, rec_s, rec_l, nano, same = [], [], [], [], [], []
    out = tmp / "recipe"
    for pair in range(args.pairs):
        s, m = run_baseline(train, vocab, args.baseline_steps, seed=1337 + pair)
        base_s.append(s)
        base_l.append(val_loss(m, val))
        print(f"pair {pair}: baseline {s:.0f} s, val {base_l[-1]:.4f}", flush=True)
        s, m, cfg = run_recipe(Path(args.recipe), data, out, threads, args.recipe_steps)
        rec_s.append(s)
        rec_l.append(val_loss(m, val))
        print(f"pair {pair}: recipe {s:.0f} s, val {rec_l[-1]:.4f}", flush=True)
        if args.nanogpt:
            nano.append(run_nanogpt(Path(args.nanogpt), args.baseline_steps, threads))
            print(f"pair {pair}: nanoGPT train.py {nano[-1][0]:.0f} s, its val {nano[-1][1]:.4f}", flush=True)
            same.append(run_lmforge_nanogpt_setting(data, args.baseline_steps, threads))
            print(f"pair {pair}: lmforge pretrain, nanoGPT's setting {same[-1][0]:.0f} s, its val {same[-1][1]:.4f}",
                  flush=True)
    med = statistics.median
    budget = med(base_s)
    rows = [["reference loop, nanoGPT CPU setup (2000 steps, batch 12)", f"{budget:.0f}", f"{med(base_l):.4f}",
             "1.00", "(baseline; nanoGPT reports 1.88)"]]
    if nano:
        ns = med([s for s, _ in nano])
        rows.append(["nanoGPT train.py, README CPU command (its own eval)", f"{ns:.0f}",
                     f"{med([v for _, v in nano]):.4f}", f"{ns / budget:.2f}", "(side by side)"])
        ls = med([s for s, _ in same])
        rows.append(["lmforge pretrain, the same setting (shakespeare-char-nanogpt.yaml, its own eval)", f"{ls:.0f}",
                     f"{med([v for _, v in same]):.4f}", f"{ls / budget:.2f}",
                     f"(side by side: {ns / ls:.2f}x nanoGPT's speed, whole processes)"])
    rows.append([f"lmforge {Path(args.recipe).name} ({cfg.train.steps} steps, batch {cfg.train.batch_size})",
                 f"{med(rec_s):.0f}", f"{med(rec_l):.4f}", f"{med(rec_s) / budget:.2f}",
                 f"{verdict(med(rec_l), 1.75, higher_is_better=False)}, time "
                 f"{'within' if med(rec_s) <= budget else 'OVER'} budget"])
    table(f"Time to quality, tinyshakespeare char ({threads} threads; val loss over all 64-token windows of the "
          f"val split)", ["run", "wall s", "val loss", "time / budget", "target"], rows)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
