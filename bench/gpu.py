"""GPU benchmarks (never run in CI): training MFU of the 124M config and time to validation loss 1.47 on
tinyshakespeare-char, with bf16 autocast, fused AdamW, flash SDPA and torch.compile.

    python -m bench.gpu [--dry-run] [--skip-ttq] [--target 1.47]

MFU: GPT-2 124M shape, block 1024, batch 16, ``lmforge`` model and optimizer builder with dtype bf16 and
fused AdamW, each Transformer block compiled with torch.compile (the model's forward stays plain: the
blocks are wrapped from outside), the training loop's step (the model's own loss, clipping, AdamW), measured
against a bf16 matmul peak measured in the same run (an
8192^3 GEMM). Time to quality: ``lmforge pretrain`` with nanoGPT's shakespeare_char GPU setting (6 layers,
6 heads, 384 wide, context 256, batch 64, dropout 0.2, lr 1e-3 cosine to 1e-4 over 5000 steps), bf16,
compiled; the wall-clock from the start of training to the first evaluation (every 250 steps) at or below
the target (nanoGPT: about 3 minutes on one A100 to ~1.47).

``--dry-run`` runs the same code on the CPU with tiny sizes and a few steps (checks the script, no figures).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .common import table


def mfu_bench(device: str, dry: bool) -> list:
    from lmforge.config import OptimConfig
    from lmforge.models import build_model
    from lmforge.models.presets import get_preset
    from lmforge.train.loop import autocast
    from lmforge.train.optim import build_optimizer, clip_and_step

    cfg = get_preset("gpt2-124m")
    B, T, steps = 16, 1024, 30
    if dry:
        cfg = dataclasses.replace(cfg, n_layers=2, n_heads=2, d_model=64, vocab_size=512, block_size=64)
        B, T, steps = 2, 64, 3
    model = build_model(cfg).to(device)
    # Per-block compilation: a short compile, the same speed as the whole model. The dry run compiles too
    # (inductor's C++ backend on the CPU) where a C++ compiler is found, so the compiled path is checked.
    if not dry or shutil.which(os.environ.get("CXX", "g++")):
        for block in model.blocks:
            block.compile()
    opt = build_optimizer(model, OptimConfig(lr=6e-4, fused=device == "cuda"), device)
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = torch.bfloat16 if device == "cuda" else None
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device, generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=device, generator=g)

    def step():  # the training loop's step: the model's own loss, clipping, AdamW
        with autocast(torch.device(device), dtype):
            loss = model(x, targets_BT=y)
        loss.backward()
        clip_and_step(opt, params, 1.0)
        opt.zero_grad(set_to_none=True)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # compile and warm up
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    sec = (time.perf_counter() - t0) / steps
    n = sum(p.numel() for p in model.parameters()) - cfg.block_size * cfg.d_model
    flops = (6 * n + 12 * cfg.n_layers * cfg.d_model * T) * B * T / sec
    m = 8192 if not dry else 256
    a = torch.randn(m, m, device=device, dtype=dtype or torch.float32)
    b = torch.randn(m, m, device=device, dtype=dtype or torch.float32)
    a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    peak = 2 * m ** 3 * 10 / (time.perf_counter() - t0)
    return [f"124M training step, B={B} T={T}{' (dry run: tiny)' if dry else ''}", f"{B * T / sec:,.0f} tok/s",
            f"MFU {flops / peak:.1%} of measured {'bf16' if dtype else 'fp32'} peak {peak / 1e12:.1f} TFLOP/s"]


def ttq_bench(device: str, dry: bool, target: float) -> list:
    from lmforge.cli import pretrain_config_from_args
    from lmforge.config import PrepareConfig
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.pretrain import pretrain

    from .common import DATA_TEXT

    tmp = Path(tempfile.mkdtemp(prefix="lmforge-gpu-"))
    try:
        Tokenizer.train_from_iterator([DATA_TEXT.read_text(encoding="utf-8")], kind="char").save(tmp / "tok")
        prepare(PrepareConfig(input=[str(DATA_TEXT)], tokenizer=str(tmp / "tok"), out=str(tmp / "data")),
                progress=False)
        argv = ["--preset", "char-tiny", "--data", str(tmp / "data"), "--out", str(tmp / "run"),
                "--model.n-layers", "6", "--model.n-heads", "6", "--model.d-model", "384", "--model.block-size", "256",
                "--model.dropout", "0.2", "--optim.lr", "1e-3", "--optim.min-lr", "1e-4", "--optim.beta2", "0.99",
                "--optim.warmup-steps", "100", "--train.steps", "5000", "--train.batch-size", "64",
                "--train.eval-every", "250", "--train.eval-batches", "200", "--train.save-every", "0",
                "--train.no-plot", "--train.dtype", "bf16", "--train.compile", "--train.device", device]
        if dry:
            argv += ["--train.steps", "4", "--train.eval-every", "2", "--train.eval-batches", "2",
                     "--model.n-layers", "1", "--model.d-model", "48", "--model.n-heads", "2",
                     "--train.batch-size", "2", "--train.dtype", "fp32", "--train.no-compile", "--train.no-progress"]
        t0 = time.perf_counter()
        pretrain(pretrain_config_from_args(argv), log=lambda *a: None)
        total = time.perf_counter() - t0
        events = [json.loads(line) for line in open(tmp / "run" / "metrics.jsonl")]
        train_t = {e["step"]: e["elapsed_s"] for e in events if e.get("event") == "train"}
        hit = next((e for e in events if e.get("event") == "val" and e["val_loss"] <= target), None)
        best = min((e["val_loss"] for e in events if e.get("event") == "val"), default=float("nan"))
        when = f"{train_t.get(hit['step'], float('nan')):.0f} s (step {hit['step']})" if hit else "not reached"
        return [f"time to val loss {target} (tinyshakespeare char){' (dry run)' if dry else ''}", when,
                f"best val {best:.4f}, whole run {total:.0f} s"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--skip-ttq", action="store_true")
    ap.add_argument("--target", type=float, default=1.47)
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU (use --dry-run to check it on the CPU)")
    device = "cuda" if not args.dry_run else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = [mfu_bench(device, args.dry_run)]
    if not args.skip_ttq:
        rows.append(ttq_bench(device, args.dry_run, args.target))
    table("GPU (bench/gpu.py)", ["what", "measured", "detail"], rows)
    return rows


if __name__ == "__main__":
    main()
