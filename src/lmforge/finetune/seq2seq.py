"""`lmforge finetune seq2seq`: train an encoder-decoder on source -> target pairs through the one training loop.

Data: .jsonl, one {"source": ..., "target": ...} object per line (field names configurable). Unless
--val-data is given, a seeded random --val-fraction of the pairs is held out; the split depends only on
the seed, so a resumed run holds out the same pairs.

Each example becomes (Vaswani et al. 2017; teacher forcing):
    source          src_ids[:max_source_len - 1] + [EOS]
    decoder input   [decoder_start] + tgt_ids                    (the target shifted right)
    labels          tgt_ids + [EOS]                               (padding: -100, ignored by the loss)
with tgt_ids cut to max_target_len - 1. The loss is the label-smoothed cross-entropy of every label.

The order of examples is a pure function of (seed, global sample index): epoch e = g // n visits the pairs
in ``randperm(n)`` drawn from ``epoch_seed(seed, e)``; so resume is exact and processes under torchrun
take disjoint indices, as in pretraining (data/loader.py).

Tokenizers. From scratch, one byte-level BPE (or char) tokenizer is trained on both sides of the training
pairs (shared vocabulary, one embedding matrix), or with --shared-vocab false one per side. Checkpoint
layout: CKPT/tokenizer.json is the target tokenizer (the one whose ids the output layer predicts; the
shared one when shared), CKPT/src_tokenizer/tokenizer.json the source tokenizer when it differs.

At the end of the run, the final model translates the held-out sources (greedy, up to 500 of them) and
the recipe writes BLEU, chrF and ROUGE (eval/text_metrics.py) to RUN/eval.json and metrics.jsonl, next to
the copy-the-source baseline, which tells how much of the score needs no model at all.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Seq2SeqFinetuneConfig, Seq2SeqGenerateConfig, UserError, write_run_yaml

SRC_TOKENIZER_DIR = "src_tokenizer"


# --------------------------------------------------------------------------------------------------
# Data


def read_pairs(path: str | Path, source_field: str = "source", target_field: str = "target") -> list[tuple[str, str]]:
    """(source, target) strings from a .jsonl file; a malformed line is an error naming its number."""
    from .data import read_jsonl

    pairs = []
    for no, obj in read_jsonl(path):
        for name in (source_field, target_field):
            if name not in obj:
                raise UserError(f"{path} line {no}: missing field {name!r} (fields: {', '.join(sorted(obj))}); "
                                f"set --source-field/--target-field")
            if not isinstance(obj[name], str):
                raise UserError(f"{path} line {no}: field {name!r} must be a string, got {type(obj[name]).__name__}")
        pairs.append((obj[source_field], obj[target_field]))
    return pairs


def split_pairs(pairs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random hold-out: (train, val)."""
    n_val = int(round(len(pairs) * val_fraction))
    if val_fraction > 0 and len(pairs) >= 2:
        n_val = max(1, n_val)
    if n_val >= len(pairs):
        raise UserError(f"only {len(pairs)} pairs: too few to hold out {val_fraction:.0%} for validation; add data "
                        f"or lower --val-fraction")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(order[:n_val])
    held = set(val)
    return [pairs[i] for i in range(len(pairs)) if i not in held], [pairs[i] for i in val]


class TokenizerPair:
    """The source and target tokenizers of a seq2seq checkpoint (the same object when shared)."""

    def __init__(self, src, tgt):
        self.src, self.tgt = src, tgt

    @property
    def shared(self) -> bool:
        return self.src is self.tgt

    def save(self, directory: str | Path) -> None:
        """tokenizer.json (+ tokenizer_config.json) for the target; src_tokenizer/ for a separate source."""
        self.tgt.save(directory)
        if not self.shared:
            self.src.save(Path(directory) / SRC_TOKENIZER_DIR)

    @classmethod
    def load(cls, directory: str | Path) -> Optional["TokenizerPair"]:
        from ..tokenizer import Tokenizer

        d = Path(directory)
        if not (d / "tokenizer.json").is_file():
            return None
        tgt = Tokenizer.load(d)
        src = Tokenizer.load(d / SRC_TOKENIZER_DIR) if (d / SRC_TOKENIZER_DIR / "tokenizer.json").is_file() else tgt
        return cls(src, tgt)


def special_ids(tok) -> tuple[int, int]:
    """(eos, pad) of a tokenizer; lmforge tokenizers have both, others must too."""
    eos, pad = tok.eos_id, tok.pad_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token; seq2seq needs one to end sources and targets")
    return eos, (pad if pad is not None else eos)


class PairData:
    """Tokenized pairs and the batches built from them (see the module docstring)."""

    def __init__(self, pairs: list[tuple[str, str]], toks: TokenizerPair, max_src: int, max_tgt: int, start_id: int):
        self.src_eos, self.src_pad = special_ids(toks.src)
        self.eos, self.pad = special_ids(toks.tgt)
        self.start = start_id
        src_ids = toks.src.encode_batch([s for s, _ in pairs])
        tgt_ids = toks.tgt.encode_batch([t for _, t in pairs])
        self.src = [np.asarray(list(s[: max_src - 1]) + [self.src_eos], dtype=np.int64) for s in src_ids]
        self.tgt = [np.asarray(list(t[: max_tgt - 1]), dtype=np.int64) for t in tgt_ids]
        self.texts = pairs

    def __len__(self) -> int:
        return len(self.src)

    @property
    def mean_tokens(self) -> float:
        return float(np.mean([len(s) + len(t) + 1 for s, t in zip(self.src, self.tgt)]))

    def batch(self, rows: list[int]) -> dict:
        S = max(len(self.src[r]) for r in rows)
        T = max(len(self.tgt[r]) for r in rows) + 1
        src = torch.full((len(rows), S), self.src_pad, dtype=torch.long)
        mask = torch.zeros((len(rows), S), dtype=torch.bool)
        dec_in = torch.full((len(rows), T), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), T), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            s, t = torch.from_numpy(self.src[r]), torch.from_numpy(self.tgt[r])
            src[i, : len(s)], mask[i, : len(s)] = s, True
            dec_in[i, 0] = self.start
            dec_in[i, 1: len(t) + 1] = t
            labels[i, : len(t)] = t
            labels[i, len(t)] = self.eos
        return {"src": src, "src_mask": mask, "dec_in": dec_in, "labels": labels}


class PairSampler:
    """Global sample index -> pair index: a fresh seeded permutation per epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perm: tuple[int, list[int]] = (-1, [])

    def __call__(self, g: int) -> int:
        from ..data.loader import epoch_seed

        epoch = g // self.n
        if self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=gen).tolist())
        return self._perm[1][g % self.n]


def seq2seq_loss(model, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean label-smoothed cross-entropy of every target token (teacher forcing)."""
    logits_BTV = model(batch["src"], batch["dec_in"], src_mask_BS=batch["src_mask"])
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)


# --------------------------------------------------------------------------------------------------
# The recipe


def _train_tokenizers(cfg: Seq2SeqFinetuneConfig, train_pairs: list, log) -> TokenizerPair:
    from ..tokenizer import Tokenizer

    if cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer)
        return TokenizerPair(tok, tok)
    log(f"training {'a shared' if cfg.shared_vocab else 'a source and a target'} {cfg.tokenizer_kind} tokenizer "
        f"on {len(train_pairs):,} pairs")
    if cfg.shared_vocab:
        texts = [s for s, _ in train_pairs] + [t for _, t in train_pairs]
        tok = Tokenizer.train_from_iterator(texts, cfg.tokenizer_kind, cfg.vocab_size)
        return TokenizerPair(tok, tok)
    src = Tokenizer.train_from_iterator([s for s, _ in train_pairs], cfg.tokenizer_kind, cfg.vocab_size)
    tgt = Tokenizer.train_from_iterator([t for _, t in train_pairs], cfg.tokenizer_kind, cfg.vocab_size)
    return TokenizerPair(src, tgt)


def _scratch_config(cfg: Seq2SeqFinetuneConfig, toks: TokenizerPair):
    eos, pad = special_ids(toks.tgt)
    start = toks.tgt.bos_id if toks.tgt.bos_id is not None else pad
    mcfg = dataclasses.replace(cfg.arch, vocab_size=toks.tgt.vocab_size,
                               src_vocab_size=None if toks.shared else toks.src.vocab_size,
                               pad_id=pad, decoder_start_id=start)
    return mcfg.validate("arch")


def finetune_seq2seq(cfg: Seq2SeqFinetuneConfig, log: Callable[[str], None] = print) -> Path:
    """Run (or resume) a seq2seq training run; returns the final checkpoint directory."""
    from ..checkpoint import load_checkpoint, unwrap
    from ..train.distributed import init_distributed
    from ..train.loop import TrainTask, load_resume_state, train

    cfg.validate()
    pairs = read_pairs(cfg.data, cfg.source_field, cfg.target_field)
    if cfg.val_data:
        train_pairs, val_pairs = pairs, read_pairs(cfg.val_data, cfg.source_field, cfg.target_field)
    elif cfg.val_fraction > 0:
        train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.train.seed)
    else:
        train_pairs, val_pairs = pairs, []
    info = init_distributed(cfg.train)
    if not info.is_main:
        log = lambda *_: None  # noqa: E731  only rank 0 talks
    out = Path(cfg.out)

    found = load_resume_state(out) if cfg.resume else None
    if cfg.resume and found is None:
        log(f"note: {out} has no checkpoint to resume from; starting a new run")
    if not cfg.resume and info.is_main and (any((out / "checkpoints").glob("step-*")) or (out / "final").exists()):
        raise UserError(f"run directory {out} already holds checkpoints; pass --resume to continue it or choose "
                        f"another --out")
    torch.manual_seed(cfg.train.seed)
    if found is not None:
        ckpt, state = found
        per_step = cfg.train.batch_size * cfg.train.grad_accum * info.world_size
        if state.get("samples_per_step", per_step) != per_step:
            raise UserError(f"the global batch changed ({state['samples_per_step']} samples per step in the checkpoint, "
                            f"{per_step} now); keep batch_size x grad_accum x processes equal")
        model, _, _ = load_checkpoint(ckpt)
        toks = TokenizerPair.load(ckpt)
        log(f"resuming from {ckpt} (step {state['step']})")
    elif cfg.model:
        model, _, meta = load_checkpoint(cfg.model)
        from ..checkpoint import resolve

        toks = TokenizerPair.load(resolve(cfg.model)[1]) if meta.get("source") != "hf" else None
        if toks is None and cfg.tokenizer:
            from ..tokenizer import Tokenizer

            tok = Tokenizer.load(cfg.tokenizer)
            toks = TokenizerPair(tok, tok)
        if toks is None:
            raise UserError(f"{cfg.model} has no lmforge tokenizer; give one with --tokenizer DIR")
    else:
        toks = _train_tokenizers(cfg, train_pairs, log)
        from ..models import build_model

        model = build_model(_scratch_config(cfg, toks))
    model.train()
    mcfg = unwrap(model).cfg
    if mcfg.arch != "seq2seq":
        raise UserError(f"{cfg.model}: an encoder-decoder (seq2seq) model is needed, this one is arch {mcfg.arch}")
    if toks.tgt.vocab_size > mcfg.vocab_size or toks.src.vocab_size > (mcfg.src_vocab_size or mcfg.vocab_size):
        raise UserError("the tokenizer has more tokens than the model has embedding rows; give the model's own "
                        "tokenizer")
    start = mcfg.decoder_start_id if mcfg.decoder_start_id is not None else (toks.tgt.bos_id or 0)
    train_data = PairData(train_pairs, toks, cfg.max_source_len, cfg.max_target_len, start)
    val_data = PairData(val_pairs, toks, cfg.max_source_len, cfg.max_target_len, start) if val_pairs else None
    sampler = PairSampler(len(train_data), cfg.train.seed)

    if info.is_main:
        write_run_yaml(cfg, out)

    def get_batch(indices: list[int]) -> dict:
        return train_data.batch([sampler(g) for g in indices])

    eval_batches = None
    if val_data is not None and cfg.train.eval_every:
        bs = cfg.train.batch_size
        n = min(len(val_data), bs * cfg.train.eval_batches)
        fixed = [val_data.batch(list(range(s, min(s + bs, n)))) for s in range(0, n, bs)]
        eval_batches = lambda: iter(fixed)  # noqa: E731

    ls = cfg.label_smoothing
    n_params = unwrap(model).num_params()
    log(f"model: {n_params / 1e6:.2f}M parameters, {mcfg.enc_layers}+{mcfg.dec_layers} layers, d_model "
        f"{mcfg.d_model}, vocab {mcfg.vocab_size}{'' if toks.shared else f' (source {mcfg.src_vocab_size})'}; "
        f"data: {len(train_data):,} training pairs, {len(val_pairs):,} held out")
    task = TrainTask(model=model, get_batch=get_batch, loss_fn=lambda m, b: seq2seq_loss(m, b, ls),
                     tokens_per_sample=max(1, int(train_data.mean_tokens)), eval_batches=eval_batches,
                     tokenizer=toks, extra_config={"objective": "seq2seq", "shared_vocab": toks.shared})
    final = train(task, cfg.train, cfg.optim, out, resume=found, dist_info=info, log=log)
    if info.is_main and val_pairs and final.name == "final":
        score_heldout(unwrap(model), toks, val_pairs, out, log)
    return final


def score_heldout(model, toks: TokenizerPair, val_pairs: list, out: Path, log, limit: int = 500) -> dict:
    """Greedy outputs for up to ``limit`` held-out sources, scored against their targets (and the
    copy-the-source baseline); written to RUN/eval.json and metrics.jsonl."""
    from ..eval.text_metrics import text_scores
    from ..seq2seq_generate import translate_texts
    from ..train.metrics import MetricsLog

    model.eval()
    srcs, refs = [s for s, _ in val_pairs[:limit]], [t for _, t in val_pairs[:limit]]
    hyps = translate_texts(model, toks.src, toks.tgt, srcs, Seq2SeqGenerateConfig(max_new_tokens=128), batch_size=32,
                           progress=False)
    result = {"examples": len(srcs), "decoding": "greedy", "model": text_scores(hyps, refs),
              "copy_source_baseline": text_scores(srcs, refs),
              "samples": [{"source": s, "reference": r, "output": h} for s, r, h in list(zip(srcs, refs, hyps))[:10]]}
    (out / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    log_ = MetricsLog(out / "metrics.jsonl", enabled=True)
    log_.write(event="heldout", **{f"{k}": v for k, v in result["model"].items()},
               **{f"copy_{k}": v for k, v in result["copy_source_baseline"].items()})
    log_.close()
    m, c = result["model"], result["copy_source_baseline"]
    log(f"held-out ({len(srcs)} pairs, greedy): BLEU {m['bleu']:.2f} chrF {m['chrf']:.2f} ROUGE-L {m['rougeL']:.2f} "
        f"| copy-the-source baseline: BLEU {c['bleu']:.2f} chrF {c['chrf']:.2f} ROUGE-L {c['rougeL']:.2f}")
    return result
