"""Training-step throughput: lmforge against a minimal plain-PyTorch reference (bench/ref_gpt.py) and
against transformers' GPT2LMHeadModel trained by the same reference loop, with MFU against a matmul peak
measured in the same run.

    python -m bench.train_step [--config char|124m|both] [--rounds 5] [--reps 10] [--threads N]
    python -m bench.train_step --shape n_layers=6,n_heads=6,d_model=384,block_size=256,batch=8
    python -m bench.train_step --config 124m --profile   # and where lmforge's step spends its time
    python -m bench.train_step --config 124m --compare-loss   # and lmforge with the plain head + loss
    python -m bench.train_step --config 124m --compare-linear # and lmforge with MKL for every product

A step is forward, cross-entropy, backward, gradient clipping at 1.0 and AdamW (lr 1e-3, weight decay 0.1
on matrices), on one fixed batch of random tokens. lmforge's step uses lmforge's model, its optimizer
builder (the defaults of ``lmforge pretrain``) and its loss function, as ``train/loop.py`` does.
Configurations:
    char   nanoGPT's CPU Shakespeare setting: 4 layers, 4 heads, 128 wide, block 64, batch 12, vocab 65;
           once as nanoGPT trains it (no biases, exact GELU), once as GPT-2 is (biases, tanh GELU), which
           is the architecture transformers' GPT2LMHeadModel implements
    124m   GPT-2 small (12 layers, 12 heads, 768 wide, vocab 50257), block 128, batch 4 (CPU-sized batch)
    --shape k=v,...  any other configuration: the char one with these entries changed (vocab_size,
           block_size, n_layers, n_heads, d_model, batch), run like char (both architectures)
MFU = model FLOPs per second / the fp32 matmul peak (a 1024^3 GEMM, interleaved with the candidates). The
header also gives that peak as a share of the vector units' own rate (a loop of independent FMAs in
registers, csrc/peak.c), what no matmul can exceed.
Model FLOPs per token: 6 N + 12 L C T (N = parameters doing matmuls, i.e. all but the position
embedding; the attention term as in PaLM, Chowdhery et al. 2022, appendix B).
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
from typing import Optional

import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.models import head_loss

from .common import (fma_peak_flops, interleave, machine, matmul_peak_flops, set_threads, shape_arg, table,
                     verdict)
from .ref_gpt import RefConfig, RefGPT, ref_optimizer, ref_step

CONFIGS = {
    "char": dict(vocab_size=65, block_size=64, n_layers=4, n_heads=4, d_model=128, batch=12),
    "124m": dict(vocab_size=50257, block_size=128, n_layers=12, n_heads=12, d_model=768, batch=4),
    "tiny": dict(vocab_size=65, block_size=32, n_layers=2, n_heads=2, d_model=32, batch=4),  # smoke tests
}


def lmforge_model(c: dict, gpt2: bool):
    from lmforge.models import build_model
    from lmforge.models.presets import get_preset

    cfg = dataclasses.replace(get_preset("gpt2-124m"), vocab_size=c["vocab_size"], block_size=c["block_size"],
                              n_layers=c["n_layers"], n_heads=c["n_heads"], d_model=c["d_model"],
                              bias=gpt2, mlp="gelu_tanh" if gpt2 else "gelu")
    model = build_model(cfg)
    from lmforge.kernels import use_cpu_kernels

    use_cpu_kernels(model)  # what the training loop does on the CPU
    return model


def hf_model(c: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=c["vocab_size"], n_positions=c["block_size"], n_embd=c["d_model"],
                                      n_layer=c["n_layers"], n_head=c["n_heads"], resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                      attn_implementation="sdpa"))


def flops_per_token(model, c: dict) -> float:
    n = sum(p.numel() for p in model.parameters())  # tied head counted once
    n -= c["block_size"] * c["d_model"]  # position embedding: a lookup, no matmul
    return 6 * n + 12 * c["n_layers"] * c["d_model"] * c["block_size"]


def profile_step(step, peak_flops: float, top: int = 12) -> list[list]:
    """One call of ``step`` under torch.profiler: the operators taking the most time (self CPU time), with
    the matrix products' GFLOP/s and share of the matmul peak from their shapes. Returns the table's rows."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    # The products and their operands as [M, K] x [K, N]: mm(a, b), addmm(bias, a, b) and addmm_ (MKL),
    # and oneDNN's linear(x [M, K], weight [N, K], bias), shown as x times the weight transposed.
    products = ("aten::mm", "aten::addmm", "aten::addmm_", "mkldnn::_linear_pointwise")
    matmul = sum(e.self_cpu_time_total for e in events if e.key in products)
    rows = []
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        rate, shapes = "", [s for s in (e.input_shapes or []) if s]
        operands = shapes[-2:]
        if e.key in products and len(shapes) >= 2:
            if e.key == "mkldnn::_linear_pointwise":
                operands = [shapes[0], shapes[1][::-1]]
            elif e.key == "aten::mm":
                operands = shapes[:2]
            (m, k), n = operands[0], operands[1][1]
            gflops = 2 * m * k * n * e.count / (e.self_cpu_time_total / 1e6) / 1e9
            rate = f"{gflops:.0f} ({gflops * 1e9 / peak_flops:.0%})"
        rows.append([e.key, " x ".join(str(list(s)) for s in operands), e.count,
                     f"{e.self_cpu_time_total / 1e3:.1f}", f"{e.self_cpu_time_total / total:.1%}", rate])
    table(f"Where lmforge's step goes (torch.profiler, one step; matrix products {matmul / total:.1%} of "
          f"{total / 1e3:.0f} ms)", ["operator", "input shapes", "calls", "ms", "share", "GFLOP/s (of peak)"], rows)
    return rows


def run_config(name: str, rounds: int, reps: int, seed: int = 0, c: Optional[dict] = None,
               profile: bool = False, compare_loss: bool = False, compare_linear: bool = False) -> list[list]:
    from lmforge.config import OptimConfig
    from lmforge.train.optim import build_optimizer, clip_and_step
    from lmforge.train.pretrain import causal_lm_loss

    c = c or CONFIGS[name]
    B, T = c["batch"], c["block_size"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, c["vocab_size"], (B, T), generator=g)
    y = torch.randint(0, c["vocab_size"], (B, T), generator=g)
    ocfg = OptimConfig(lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.99)
    fns, models = {}, {}

    def lm_step_fn(model, opt, fused_loss: bool = True, onednn: bool = True):
        def step():
            head_loss.enabled = fused_loss
            dnn = kernels.onednn_linear_available()
            kernels._onednn_ok = dnn and onednn
            try:
                loss = causal_lm_loss(model, {"x": x, "y": y})
                loss.backward()
            finally:
                head_loss.enabled = True
                kernels._onednn_ok = dnn
            clip_and_step(opt, model.parameters(), 1.0)
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step

    def hf_loss(m, x, y):
        return F.cross_entropy(m(x).logits.flatten(0, 1), y.flatten())

    variants = [("gpt2", True)] if name == "124m" else [("nanogpt", False), ("gpt2", True)]
    for arch, gpt2 in variants:
        torch.manual_seed(seed)
        ref = RefGPT(RefConfig(c["vocab_size"], T, c["n_layers"], c["n_heads"], c["d_model"], bias=gpt2,
                               gelu_approx="tanh" if gpt2 else "none"))
        ropt = ref_optimizer(ref)
        fns[f"{arch}: reference"] = (lambda m=ref, o=ropt: ref_step(m, o, x, y))
        models[f"{arch}: reference"] = ref
        lm = lmforge_model(c, gpt2)
        fns[f"{arch}: lmforge"] = lm_step_fn(lm, build_optimizer(lm, ocfg, "cpu"))
        models[f"{arch}: lmforge"] = lm
        if gpt2:
            hf = hf_model(c)
            hopt = ref_optimizer(hf)
            fns[f"{arch}: transformers"] = (lambda m=hf, o=hopt: ref_step(m, o, x, y, loss_fn=hf_loss))
            models[f"{arch}: transformers"] = hf
        # lmforge's step with one of its speed-ups off: (label, wanted, optimizer settings, step switches)
        switched = [("LMFORGE_FUSED_LOSS=0", compare_loss and gpt2, ocfg, dict(fused_loss=False)),
                    ("LMFORGE_ONEDNN_LINEAR=0", compare_linear and gpt2, ocfg, dict(onednn=False)),
                    ("optim.fused=false", name != "124m", dataclasses.replace(ocfg, fused=False), {})]
        for label, wanted, settings, switches in switched:
            if wanted:
                m = lmforge_model(c, gpt2)
                fns[f"{arch}: lmforge, {label}"] = lm_step_fn(m, build_optimizer(m, settings, "cpu"), **switches)
                models[f"{arch}: lmforge, {label}"] = m
    peak = []
    n_peak = 1024 if name != "tiny" else 256

    def peak_fn():
        peak.append(matmul_peak_flops(n_peak, rounds=2))

    # Minor page faults (fresh pages the kernel zero-fills) per candidate, after its warm-up call.
    faults: dict[str, list[int]] = {k: [] for k in fns}

    def timed(k: str):
        def run():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(reps):
                fns[k]()
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return run

    t = interleave({**{k: timed(k) for k in fns}, "peak": peak_fn}, rounds=rounds)
    peak_flops = sorted(peak)[len(peak) // 2]
    rows = []
    for arch, _ in variants:
        base = t[f"{arch}: reference"] / reps
        for k in [k for k in fns if k.startswith(arch)]:
            sec = t[k] / reps
            tps = B * T / sec
            mfu = flops_per_token(models[k], c) * tps / peak_flops
            ratio = base / sec
            target = ""
            if k.endswith(": lmforge"):
                target = verdict(ratio, 1.0)
            rows.append([f"{name} {k}", f"{sec * 1e3:.1f}", f"{tps:,.0f}", f"{mfu:.1%}",
                         f"{sum(faults[k][1:]) / (rounds * reps):,.0f}", f"{ratio:.2f}x", target])
        if f"{arch}: transformers" in fns:
            hf_sec = t[f"{arch}: transformers"] / reps
            for k in [k for k in fns if k.startswith(f"{arch}: lmforge")]:
                r = hf_sec / (t[k] / reps)
                rows.append([f"{name} {k} vs transformers", "", "", "", "", f"{r:.2f}x", verdict(r, 1.25)])
    fma = fma_peak_flops()
    print(f"{name}: B={B} T={T}, matmul peak {peak_flops / 1e9:.1f} GFLOP/s"
          + (f" ({peak_flops / fma:.0%} of the FMA-loop peak, {fma / 1e9:.1f})" if fma else "")
          + f", {rounds} rounds x {reps} steps")
    if profile:
        profile_step(fns["gpt2: lmforge"], peak_flops)
    return rows


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="both", choices=["char", "124m", "both", "tiny"])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--reps", type=int, default=0, help="steps per round (0: 10 for char, 2 for 124m)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--profile", action="store_true",
                    help="also profile one of lmforge's GPT-2-style steps (torch.profiler) and print where it goes")
    ap.add_argument("--shape", type=shape_arg(CONFIGS["char"]),
                    help="run this configuration instead: key=value,... over the char one's entries")
    ap.add_argument("--compare-loss", action="store_true",
                    help="add lmforge's GPT-2-style step with the plain logits + cross-entropy path "
                         "(LMFORGE_FUSED_LOSS=0) instead of the chunked head loss")
    ap.add_argument("--compare-linear", action="store_true",
                    help="add lmforge's GPT-2-style step with every product through torch's mm/F.linear (MKL) "
                         "instead of oneDNN for the linear layers (LMFORGE_ONEDNN_LINEAR=0)")
    ap.add_argument("--glibc-malloc", action="store_true",
                    help="leave malloc at glibc's defaults for every candidate; by default the whole run gets "
                         "the setting lmforge's training loop applies (lmforge.train.memory)")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads, tune_malloc=not args.glibc_malloc)
    print(f"machine: {machine()}")
    names = ["char", "124m"] if args.config == "both" else [args.config]
    rows = []
    if args.shape:
        c = args.shape
        print("custom: " + ", ".join(f"{k}={v}" for k, v in c.items()))
        rows += run_config("custom", args.rounds, args.reps or 10, c=c, profile=args.profile,
                           compare_loss=args.compare_loss, compare_linear=args.compare_linear)
        names = []
    for n in names:
        reps = args.reps or (2 if n == "124m" else 10)
        rows += run_config(n, args.rounds, reps, profile=args.profile,
                           compare_loss=args.compare_loss, compare_linear=args.compare_linear)
    table(f"Training step ({threads} threads; ratio = baseline s/step / candidate s/step)",
          ["config: candidate", "ms/step", "tokens/s", "MFU", "page faults/step", "vs reference", "target"], rows)
    return rows


if __name__ == "__main__":
    main()
