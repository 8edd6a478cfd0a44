"""Decoding speed: lmforge greedy decoding against transformers ``generate`` on the same weights, against
the memory-bandwidth bound, batch 8 against batch 1, and weight-only int8 against fp32 (speed, and
perplexity on the tinyshakespeare validation split).

    python -m bench.decode [--size 124m] [--new-tokens 128] [--prompt-tokens 32] [--rounds 3] [--threads N]
                           [--ppl-model CKPT] [--shape n_layers=24,n_heads=16,d_model=1024] [--arch gpt2|llama]

A GPT-2-124M-shaped model with random weights (the speed of a forward does not depend on the values) is
built in lmforge and copied into transformers' GPT2LMHeadModel through lmforge's own converter. Greedy
decoding of both must produce the same tokens. The memory-bandwidth bound is the rate at which the
weights read per token (every Linear weight, the output head included, plus the KV cache) can be
streamed at the read bandwidth measured in the same run: the faster of a sum over a 512 MB buffer
(torch, one stream per thread) and lmforge's product kernel reading the same amount as a 768-wide matrix
(many rows side by side, which some hosts serve faster), measured right before every timed batch-1 round of
lmforge's decoding: each round's tokens/s is set against the bound of that moment, and the median of those
ratios is reported (the host's bandwidth can double or halve within seconds). All timings are interleaved
rounds, medians reported. ``--shape`` changes entries of the 124M shape (n_layers, n_heads,
d_model, vocab_size, block_size) to run another configuration, e.g. GPT-2 medium's blocks, and ``--arch llama``
builds the llama-160m preset instead (RoPE, RMSNorm, SwiGLU, untied head) against LlamaForCausalLM.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time

import torch
import torch.nn as nn

from .common import (DATA_TEXT, interleave, kernel_read_bandwidth, machine, set_threads, shape_arg, stream_bandwidth,
                     table, verdict)

SIZES = {  # GPT-2 shapes (Radford et al. 2019); "tiny" is for smoke tests
    "124m": dict(n_layers=12, n_heads=12, d_model=768, vocab_size=50257, block_size=1024),
    "tiny": dict(n_layers=2, n_heads=2, d_model=64, vocab_size=512, block_size=256),
}


ARCHS = {"gpt2": "gpt2-124m", "llama": "llama-160m"}  # --arch: the preset whose architecture is built


def build_pair(shape: dict, seed: int = 0, arch: str = "gpt2"):
    """lmforge's model of ``arch`` (its preset with ``shape``'s entries) with random weights, and the same
    weights in transformers' model for that architecture (GPT2LMHeadModel, LlamaForCausalLM)."""
    from lmforge.interop.hf import state_to_hf
    from lmforge.models import build_model
    from lmforge.models.presets import get_preset
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = dataclasses.replace(get_preset(ARCHS[arch]), **shape)
    model = build_model(cfg).eval()
    hf_cfg, hf_state = state_to_hf(cfg, model.state_dict())
    kind = hf_cfg["model_type"]
    hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    config = AutoConfig.for_model(kind, **hf_cfg)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and all(any(s in k for s in ("lm_head", "attn.bias", "masked_bias", "rotary_emb"))
                                  for k in missing), missing
    if cfg.tie_embeddings:
        hf.tie_weights()
    return model, hf


def weight_bytes_per_token(model: nn.Module, ctx: int) -> int:
    """Bytes a one-token forward must read: every Linear's weight (int8 or fp32) and bias, plus the KV cache
    at context ``ctx`` (fp32)."""
    from lmforge.packed import PackedLinear
    from lmforge.quantize import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            total += m.in_features * m.out_features * 4 + (m.bias.numel() * 4 if m.bias is not None else 0)
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size() + (m.bias.numel() * 4 if m.bias is not None else 0)
        elif isinstance(m, QuantLinear):
            total += m.weight_int8.numel() + m.scale.numel() * 4 + (m.bias.numel() * 4 if m.bias is not None else 0)
    c = model.cfg
    total += 2 * c.n_layers * ctx * c.kv_heads * c.hd * 4
    return total


@torch.inference_mode()
def step_breakdown(model: nn.Module, steps: int = 64, prompt: int = 32) -> dict:
    """Where a batch-1 decoding step's time goes (model laid out by ``prepare_for_inference``): the step
    through the model's forward, the linear products within it (timed around each call), and the rest
    alone (the products replaced by ready-made outputs); and the compiled step (lmforge.fused) that
    generation runs instead. Milliseconds per step, and the products' GB/s of weights read."""
    import lmforge.packed as packed
    from lmforge.fused import decode_step_for

    cfg = model.cfg
    inner = packed.stream_linear
    spent = [0.0]
    ready: dict = {}

    def timed(x, w, b=None):
        t0 = time.perf_counter()
        y = inner(x, w, b)
        spent[0] += time.perf_counter() - t0
        return y

    def canned(x, w, b=None):
        key = (tuple(x.shape), w.shape[0])
        if key not in ready:
            ready[key] = torch.zeros(*x.shape[:-1], w.shape[0])
        return ready[key]

    def run(fn, compiled=None) -> float:
        packed.stream_linear = fn
        try:
            cache = model.new_cache(1, prompt + steps + 1)
            logits = model(torch.randint(0, cfg.vocab_size, (1, prompt)), cache=cache, last_only=True)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            spent[0] = 0.0
            t0 = time.perf_counter()
            for _ in range(steps):
                if compiled is not None:
                    logits = compiled(tok[:, 0], cache)[:, None]
                else:
                    logits = model(tok, cache=cache, last_only=True)  # the cache advances itself
                tok = logits[:, -1].argmax(-1, keepdim=True)
            return (time.perf_counter() - t0) / steps * 1e3
        finally:
            packed.stream_linear = inner

    step = run(timed)
    linear = spent[0] / steps * 1e3
    rest_alone = run(canned)
    fused = decode_step_for(model)
    compiled = run(inner, fused) if fused is not None else float("nan")
    nbytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, packed.StreamLinear))
    return {"step": step, "linear": linear, "rest_alone": rest_alone, "gbps": nbytes / linear / 1e6,
            "compiled": compiled, "compiled_gbps": nbytes / compiled / 1e6}


@torch.inference_mode()
def val_perplexity(model, tokens: torch.Tensor, block: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``block`` tokens covering the split."""
    n = (len(tokens) - 1) // block
    x = tokens[: n * block].view(n, block)
    y = tokens[1: n * block + 1].view(n, block)
    nll = 0.0
    for i in range(0, n, 32):
        logits = model(x[i:i + 32]).float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + 32].flatten(), reduction="sum").item()
    return math.exp(nll / (n * block))


def quick_char_model(steps: int = 300):
    """A small char-level model trained briefly on tinyshakespeare (when no checkpoint is given)."""
    import tempfile

    from lmforge.config import PretrainConfig, from_dict
    from lmforge.data.prepare import prepare
    from lmforge.config import PrepareConfig
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.pretrain import pretrain

    tmp = tempfile.mkdtemp(prefix="lmforge-bench-")
    Tokenizer.train_from_iterator([DATA_TEXT.read_text(encoding="utf-8")], kind="char").save(f"{tmp}/tok")
    prepare(PrepareConfig(input=[str(DATA_TEXT)], tokenizer=f"{tmp}/tok", out=f"{tmp}/data"), progress=False)
    cfg = from_dict(PretrainConfig, {"preset": "char-tiny", "data": f"{tmp}/data", "out": f"{tmp}/run",
                                     "optim": {"lr": 3e-3, "warmup_steps": 20},
                                     "train": {"steps": steps, "batch_size": 16, "eval_every": 0, "save_every": 0,
                                               "progress": False, "plot": False}})
    pretrain(cfg, log=lambda *a: None)
    return f"{tmp}/run/final", f"{tmp}/data"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="124m", choices=sorted(SIZES))
    ap.add_argument("--shape", type=shape_arg(SIZES["124m"]),
                    help="another shape: key=value,... over the 124m entries (overrides --size)")
    ap.add_argument("--arch", default="gpt2", choices=sorted(ARCHS),
                    help="gpt2: GPT-2 124M (GPT2LMHeadModel); llama: the llama-160m preset as it is, RoPE, "
                         "RMSNorm, SwiGLU, untied head (LlamaForCausalLM); --shape changes either")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="the batched decoding case")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores, at most 8)")
    ap.add_argument("--ppl-model", help="checkpoint for the int8 perplexity check (default: train a small one)")
    ap.add_argument("--ppl-data", help="prepared data dir holding that model's validation split")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    from lmforge.config import GenerateConfig
    from lmforge.generate import generate_ids
    from lmforge.lm import prepare_for_inference
    from lmforge.packed import StreamLinear
    from lmforge.quantize import quantize_model

    shape = args.shape or (SIZES[args.size] if args.arch == "gpt2" or args.size != "124m" else {})
    name = ARCHS[args.arch] + ("" if args.shape is None and args.size == "124m" else " with " + (
        args.size if args.shape is None else ",".join(f"{k}={v}" for k, v in shape.items())))
    model, hf = build_pair(shape, arch=args.arch)
    n_params = sum(p.numel() for p in model.parameters())
    unpacked = build_pair(shape, arch=args.arch)[0].eval()  # LM.load(..., pack=False): torch's default linear path
    prepare_for_inference(model)  # what LM.load does on the CPU: fp32 linear layers packed for oneDNN
    q8 = prepare_for_inference(build_pair(shape, arch=args.arch)[0], "int8")
    V, N, P = model.cfg.vocab_size, args.new_tokens, args.prompt_tokens
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, V, (1, P), generator=g)
    prompts8 = torch.randint(0, V, (args.batch, P), generator=g)
    gen = GenerateConfig(max_new_tokens=N, temperature=0.0)
    outs = {}

    def ours(m=model, key="ours", rows=prompt, compiled=True):
        if not compiled:
            os.environ["LMFORGE_FUSED_DECODE"] = "0"  # the model's forward for every step
        try:
            outs[key] = generate_ids(m, rows.tolist(), gen, overflow="error")
        finally:
            os.environ.pop("LMFORGE_FUSED_DECODE", None)

    @torch.inference_mode()
    def theirs():
        o = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N, min_new_tokens=N,
                        do_sample=False, pad_token_id=0)
        outs["hf"] = o[:, P:].tolist()

    # The bound is paired with each timed round: the host's read bandwidth can double or halve within
    # seconds (docs/benchmarks.md), so a bandwidth measured at another moment of the run can put a round
    # against the wrong phase. Right before every timed batch-1 round of lmforge, fp32 and int8, the
    # bandwidth is measured; each round's tokens/s is set against its own bound, and the median taken.
    bw = {"fp32": [], "int8": []}

    def read_bandwidth(key):
        def measure():
            s_, k_ = stream_bandwidth(512, rounds=2), kernel_read_bandwidth(512, rounds=2) or 0.0
            bw[key].append((max(s_, k_), s_, k_))
        return measure

    fns = {"lmforge fp32 b1": ours, "transformers generate b1": theirs,
           f"lmforge fp32 b{args.batch}": lambda: ours(key="b8", rows=prompts8),
           "lmforge int8 b1": lambda: ours(m=q8, key="q8"),
           "lmforge fp32 b1, pack=False": lambda: ours(m=unpacked, key="plain"),
           "lmforge fp32 b1, model forward": lambda: ours(key="forward", compiled=False)}
    per_round: dict[str, list[float]] = {}
    t = interleave(fns, rounds=args.rounds, samples=per_round,
                   before={"lmforge fp32 b1": read_bandwidth("fp32"), "lmforge int8 b1": read_bandwidth("int8")})
    same = outs["ours"] == outs["hf"]
    agree = sum(a == b for a, b in zip(outs["ours"][0], outs["hf"][0])) / N
    paired = bw["fp32"] + bw["int8"]
    bandwidth, bw_sum, bw_kernel = (statistics.median(m[i] for m in paired) for i in range(3))
    tps = {k: (N * (args.batch if "b8" in k or f"b{args.batch}" in k else 1)) / v for k, v in t.items()}
    ctx_avg = P + N // 2
    bytes_fp32 = weight_bytes_per_token(model, ctx_avg)
    bytes_int8 = weight_bytes_per_token(q8, ctx_avg)
    # Each round's tokens/s against that round's bound: (N / seconds) / (bandwidth / bytes per token).
    vs_bound = {k: [N / sec * b / m[0] for sec, m in zip(per_round[f"lmforge {k} b1"], bw[k])]
                for k, b in (("fp32", bytes_fp32), ("int8", bytes_int8))}
    fp32_vs_bound, int8_vs_bound = statistics.median(vs_bound["fp32"]), statistics.median(vs_bound["int8"])
    bound_fp32, bound_int8 = (statistics.median(m[0] for m in bw[k]) / b for k, b in (("fp32", bytes_fp32),
                                                                                      ("int8", bytes_int8)))
    b1, hf_b1, b8, i8 = (tps["lmforge fp32 b1"], tps["transformers generate b1"], tps[f"lmforge fp32 b{args.batch}"],
                         tps["lmforge int8 b1"])
    plain, forward = tps["lmforge fp32 b1, pack=False"], tps["lmforge fp32 b1, model forward"]
    print(f"machine: {machine()}; {threads} threads")
    print(f"model: {name}, {n_params / 1e6:.1f}M params, fp32; "
          f"prompt {P} tokens, {N} new tokens, greedy; {args.rounds} interleaved rounds (medians)")
    print(f"greedy tokens identical to transformers: {same} ({agree:.0%} of positions agree)")
    print(f"read bandwidth, measured right before each timed batch-1 round of lmforge: median {bandwidth / 1e9:.1f} "
          f"GB/s (sum {bw_sum / 1e9:.1f}, product kernel {bw_kernel / 1e9:.1f}); fp32 rounds "
          + ", ".join(f"{m[0] / 1e9:.1f}" for m in bw["fp32"]) + ", int8 rounds "
          + ", ".join(f"{m[0] / 1e9:.1f}" for m in bw["int8"])
          + f" GB/s; bytes per token fp32 {bytes_fp32 / 1e6:.0f} MB, int8 {bytes_int8 / 1e6:.0f} MB -> median bound "
          f"{bound_fp32:.1f} / {bound_int8:.1f} tok/s")
    print("each round against its own bound (the table gives the median): fp32 "
          + ", ".join(f"{r:.0%}" for r in vs_bound["fp32"]) + "; int8 "
          + ", ".join(f"{r:.0%}" for r in vs_bound["int8"]))
    rows = [
        ["lmforge fp32, batch 1 vs transformers generate", f"{b1:.1f} vs {hf_b1:.1f} tok/s", f"{b1 / hf_b1:.2f}x",
         verdict(b1 / hf_b1, 2.0)],
        ["lmforge fp32, batch 1 vs bandwidth bound", f"{b1:.1f} vs {bound_fp32:.1f} tok/s (medians)",
         f"{fp32_vs_bound:.0%}",
         verdict(fp32_vs_bound, 0.70)],
        [f"lmforge fp32, batch {args.batch} vs batch 1 (aggregate)", f"{b8:.1f} vs {b1:.1f} tok/s",
         f"{b8 / b1:.2f}x", verdict(b8 / b1, 4.0)],
        ["lmforge int8 vs fp32, batch 1", f"{i8:.1f} vs {b1:.1f} tok/s", f"{i8 / b1:.2f}x", verdict(i8 / b1, 1.7)],
        ["lmforge int8 vs int8 bandwidth bound", f"{i8:.1f} vs {bound_int8:.1f} tok/s (medians)",
         f"{int8_vs_bound:.0%}", "(info)"],
        ["lmforge fp32 batch 1, packed vs pack=False", f"{b1:.1f} vs {plain:.1f} tok/s", f"{b1 / plain:.2f}x",
         "(info)"],
        ["lmforge fp32 batch 1, compiled step vs model forward", f"{b1:.1f} vs {forward:.1f} tok/s",
         f"{b1 / forward:.2f}x", "(info)"],
    ]
    if any(isinstance(m, StreamLinear) for m in model.modules()):
        parts = step_breakdown(model)
        print(f"batch-1 step through the model's forward: {parts['step']:.1f} ms, of which {parts['linear']:.1f} ms "
              f"in the linear products ({parts['gbps']:.1f} GB/s of weights); the rest alone (products skipped): "
              f"{parts['rest_alone']:.1f} ms")
        print(f"batch-1 compiled step (lmforge.fused, what generation runs): {parts['compiled']:.2f} ms "
              f"({parts['compiled_gbps']:.1f} GB/s of weights over the whole step)")
    model = hf = q8 = unpacked = None  # free their memory before the perplexity part
    # Perplexity, fp32 vs int8, on a trained model.
    from lmforge.checkpoint import load_checkpoint
    from lmforge.data.shards import TokenData
    import numpy as np

    ckpt, data = (args.ppl_model, args.ppl_data) if args.ppl_model else quick_char_model()
    m32, _, _ = load_checkpoint(ckpt)
    m8, _, _ = load_checkpoint(ckpt)
    quantize_model(m8, "int8")
    val = TokenData(data, "val")
    tokens = torch.from_numpy(np.asarray(val.get(0, len(val))).astype(np.int64))
    block = m32.cfg.block_size
    p32, p8 = val_perplexity(m32.eval(), tokens, block), val_perplexity(m8, tokens, block)
    rows.append(["int8 perplexity vs fp32, tinyshakespeare val", f"{p8:.4f} vs {p32:.4f}",
                 f"{(p8 / p32 - 1):+.2%}", verdict(abs(p8 / p32 - 1) * 100, 1.0, higher_is_better=False).replace("1)", "1%)")])
    table("Decoding (bench/decode.py)", ["what", "measured", "ratio", "target"], rows)
    return {"tps": tps, "bandwidth": bandwidth, "bandwidth_sum": bw_sum, "bandwidth_kernel": bw_kernel,
            "paired_bandwidth": bw, "fp32_vs_bound": fp32_vs_bound, "int8_vs_bound": int8_vs_bound,
            "ppl": (p32, p8), "same": same}


if __name__ == "__main__":
    main()
