"""`lmforge quickstart`: the whole pipeline on real text in a few minutes on a laptop CPU.

corpus (Shakespeare's complete works, fetched once) -> byte-level BPE tokenizer -> token shards ->
a small Llama-style model trained for a time budget -> samples, plus the commands to go on.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .config import ModelConfig, OptimConfig, PrepareConfig, PretrainConfig, TokenizerConfig, TrainConfig


def quickstart_model(vocab_size: int) -> ModelConfig:
    """Llama-style small model: RoPE, RMSNorm, SwiGLU, tied embeddings; about 1.5M parameters."""
    return ModelConfig(vocab_size=vocab_size, block_size=128, n_layers=4, n_heads=4, n_kv_heads=4, d_model=192,
                       pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=True)


def _calibrate(mcfg: ModelConfig, batch: int, block: int, seconds: float = 4.0) -> float:
    """Seconds per optimizer step of this model on this machine (a short throwaway run)."""
    import torch
    import torch.nn.functional as F

    from .models import build_model

    model = build_model(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    x = torch.randint(0, mcfg.vocab_size, (batch, block))

    def step():
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocator and kernel selection
        step()
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]  # the median resists a busy neighbour process


def quickstart(args) -> Path:
    from .data.corpora import default_corpus
    from .data.prepare import prepare
    from .lm import LM
    from .tokenizer import Tokenizer
    from .train.pretrain import pretrain

    t_start = time.perf_counter()
    out = Path(args.out)
    print(f"lmforge quickstart: a language model from raw text, on this machine, in about {args.minutes + 1:.0f} "
          f"minutes\n")

    if args.corpus:
        corpus, about = [args.corpus], f"your corpus {args.corpus}"
    else:
        path, about = default_corpus()
        corpus = [str(path)]
    print(f"[1/4] corpus: {about}")

    tok_dir = out / "tokenizer"
    tok = Tokenizer.train(TokenizerConfig(input=corpus, kind="bpe", vocab_size=args.vocab_size, out=str(tok_dir)))
    tok.save(tok_dir)
    print(f"[2/4] tokenizer: byte-level BPE, {tok.vocab_size} tokens -> {tok_dir}")

    data_dir = out / "data"
    meta = prepare(PrepareConfig(input=corpus, tokenizer=str(tok_dir), out=str(data_dir), val_fraction=0.05))
    n_train = meta["splits"]["train"]["tokens"]
    print(f"[3/4] data: {n_train:,} training tokens, {meta['splits']['val']['tokens']:,} validation -> {data_dir}")

    mcfg = quickstart_model(tok.vocab_size)
    batch, block = 16, mcfg.block_size
    per_step = _calibrate(mcfg, batch, block)
    steps = max(50, int(args.minutes * 60 / (per_step * 1.08)))  # ~8% for evaluation and checkpoints
    run_dir = out / "run"
    cfg = PretrainConfig(
        data=str(data_dir), out=str(run_dir), model=mcfg,
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=min(100, steps // 10), schedule="wsd",
                          decay_fraction=0.3, weight_decay=0.1, beta2=0.95),
        train=TrainConfig(steps=steps, batch_size=batch, seed=args.seed, eval_every=max(1, steps // 5),
                          eval_batches=10, save_every=0, log_every=10),
    )
    resume = (run_dir / "checkpoints").exists()
    cfg = dataclasses.replace(cfg, resume=resume)
    print(f"[4/4] pretraining {mcfg.num_params() / 1e6:.1f}M parameters for {steps} steps "
          f"(~{per_step * steps / 60:.1f} min at {per_step * 1000:.0f} ms/step) -> {run_dir}")
    final = pretrain(cfg)

    lm = LM.load(final)
    print("\nsamples (temperature 0.8, top-k 50):")
    for i, prompt in enumerate(["ROMEO:", "To be, or not to be", "The king"]):
        text = lm.generate(prompt, max_new_tokens=80, temperature=0.8, top_k=50, seed=args.seed + i)
        print(f"\n--- {prompt!r}\n{prompt}{text}")

    minutes = (time.perf_counter() - t_start) / 60
    print(f"\ndone in {minutes:.1f} min. checkpoint: {final}")
    print("next:")
    print(f"  lmforge generate {run_dir} --prompt 'JULIET:' --max-new-tokens 200")
    print(f"  lmforge chat {run_dir}")
    print(f"  python -c \"from lmforge import LM; print(LM.load('{run_dir}').generate('HAMLET:'))\"")
    print(f"  loss curve: {run_dir / 'loss.png'}, metrics: {run_dir / 'metrics.jsonl'}")
    return final
