"""Generation with encoder-decoder models: greedy decoding, sampling and beam search, batched.

Every mode encodes the (right-padded) sources once, precomputes each decoder layer's cross-attention keys
and values, and then decodes one token per step through the self-attention KV cache
(``Seq2SeqModel.start_decoding`` / ``decode``). Every row starts from the model's ``decoder_start_id``.

Greedy and sampling (``num_beams == 1``) pick each next token with generate.py's ``sample_next``
(temperature, top-k, top-p, repetition penalty), so the two model families sample identically.

Beam search (``num_beams = W > 1``) keeps, per source, the W best partial hypotheses by total
log-probability. Per step it scores every (beam, token) extension, takes the 2W best, and walks them in
order: an extension that ends with EOS becomes a finished hypothesis (only when it ranks among the first
W, as in Hugging Face's implementation), the others fill the W live beams. Finished hypotheses are ranked
by the GNMT length penalty (Wu et al. 2016, eq. 14):

    score = log P(y) / lp(|y|),   lp(L) = ((5 + L) / 6) ** length_penalty,   L counts the EOS token

so length_penalty 0 ranks by raw log-probability and larger values favour longer outputs (Hugging Face
divides by L ** length_penalty instead; the two agree at 0). A source is done when it has W finished
hypotheses and the best live beam, with the same length penalty, cannot beat the worst of them. With
W = 1 this is exactly greedy decoding: the single live beam always extends with the argmax token, and the
first time EOS is the argmax the finished hypothesis outranks the live beam.

``no_repeat_ngram_size = n`` (all modes) forbids any token that would complete an n-gram already present
in that row's output (Paulus et al. 2018), the usual remedy for a summarizer repeating itself.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .config import Seq2SeqGenerateConfig, UserError


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's length normalization ((5 + L) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


def banned_tokens(history: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already in ``history``."""
    if n <= 0 or len(history) < n - 1:
        return set()
    if n == 1:
        return set(history)
    prefix = tuple(history[len(history) - (n - 1):])
    return {history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i:i + n - 1]) == prefix}


def _ban(logits_BV: torch.Tensor, histories: list[list[int]], n: int) -> torch.Tensor:
    if n <= 0:
        return logits_BV
    for r, h in enumerate(histories):
        banned = banned_tokens(h, n)
        if banned:
            logits_BV[r, list(banned)] = float("-inf")
    return logits_BV


def _pad_sources(sources: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    S = max(len(s) for s in sources)
    src_BS = torch.full((len(sources), S), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((len(sources), S), dtype=torch.bool)
    for i, s in enumerate(sources):
        src_BS[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask_BS[i, : len(s)] = True
    mask = None if bool(mask_BS.all()) else mask_BS.to(device)
    return src_BS.to(device), mask


def _max_steps(model, cfg: Seq2SeqGenerateConfig) -> int:
    steps = cfg.max_new_tokens
    if model.cfg.pos == "learned":  # learned positions end at block_size
        steps = min(steps, model.cfg.block_size)
    return steps


@torch.inference_mode()
def generate_seq2seq(model, sources: list[list[int]], cfg: Seq2SeqGenerateConfig, eos_id: int,
                     pad_id: int = 0, start_id: Optional[int] = None) -> list[list[int]]:
    """Target token ids (EOS excluded) for each source (a list of token ids, EOS included if the model was
    trained that way). Greedy/sampling for num_beams 1, beam search otherwise."""
    cfg.validate()
    model.eval()
    if not sources:
        return []
    V = model.cfg.src_vocab_size or model.cfg.vocab_size
    for i, s in enumerate(sources):
        if len(s) == 0:
            raise UserError(f"source {i} is empty; give at least one token")
        if min(s) < 0 or max(s) >= V:
            raise UserError(f"source {i} has token ids outside the model's source vocabulary [0, {V})")
    start = start_id if start_id is not None else model.cfg.decoder_start_id
    if start is None:
        raise UserError("the model has no decoder_start_id; pass start_id")
    if cfg.num_beams > 1:
        return _beam_search(model, sources, cfg, eos_id, pad_id, start)
    return _greedy_or_sample(model, sources, cfg, eos_id, pad_id, start)


def _greedy_or_sample(model, sources, cfg, eos_id, pad_id, start) -> list[list[int]]:
    from .generate import make_generators, sample_next

    device = _device_of(model)
    B = len(sources)
    steps = _max_steps(model, cfg)
    src_BS, mask_BS = _pad_sources(sources, pad_id, device)
    state = model.start_decoding(src_BS, mask_BS, max_len=steps)
    greedy = cfg.temperature == 0 or cfg.top_k == 1
    gens = None if greedy else make_generators(cfg.seed, B, device)
    outs: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    tok_B = torch.full((B,), start, dtype=torch.long, device=device)
    V = model.cfg.vocab_size
    seen_BV = torch.zeros(B, V, dtype=torch.bool, device=device) if cfg.repetition_penalty != 1.0 else None
    for _ in range(steps):
        logits_BV = model.decode(tok_B[:, None], state.cross_kv, state.src_mask, state.cache, last_only=True)[:, -1]
        logits_BV = _ban(logits_BV.float(), outs, cfg.no_repeat_ngram_size)
        tok_B = sample_next(logits_BV, cfg, gens, seen_BV)
        for r, t in enumerate(tok_B.tolist()):
            if done[r]:
                continue
            if t == eos_id:
                done[r] = True
            else:
                outs[r].append(t)
        if all(done):
            break
        if seen_BV is not None:
            seen_BV.scatter_(1, tok_B[:, None], True)
    return outs


def _beam_search(model, sources, cfg, eos_id, pad_id, start) -> list[list[int]]:
    device = _device_of(model)
    B, W = len(sources), cfg.num_beams
    steps = _max_steps(model, cfg)
    alpha = cfg.length_penalty
    src_BS, mask_BS = _pad_sources(sources, pad_id, device)
    state = model.start_decoding(src_BS, mask_BS, max_len=steps)
    state.select(torch.arange(B, device=device).repeat_interleave(W))  # row b*W + k is beam k of source b
    # Only beam 0 is alive at first, so the W beams do not start as W copies of one hypothesis.
    scores_BW = torch.full((B, W), float("-inf"), device=device)
    scores_BW[:, 0] = 0.0
    seqs: list[list[int]] = [[] for _ in range(B * W)]
    tok_R = torch.full((B * W,), start, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(steps):
        logits_RV = model.decode(tok_R[:, None], state.cross_kv, state.src_mask, state.cache, last_only=True)[:, -1]
        logp_RV = _ban(torch.log_softmax(logits_RV.float(), dim=-1), seqs, cfg.no_repeat_ngram_size)
        V = logp_RV.shape[-1]
        cand_BX = (scores_BW.reshape(-1, 1) + logp_RV).reshape(B, W * V)
        top_scores, top_idx = cand_BX.topk(2 * W, dim=1)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
        length = step + 1  # tokens in a hypothesis that ends at this step (its EOS included)
        lp = length_penalty(length, alpha)
        rows, toks, new_scores = [], [], []
        for b in range(B):
            live: list[tuple[float, int, int]] = []
            if not done[b]:
                for rank, (s, x) in enumerate(zip(top_scores[b], top_idx[b])):
                    if s == float("-inf"):
                        break
                    beam, t = divmod(x, V)
                    if t == eos_id:
                        if rank < W:
                            finished[b].append((s / lp, seqs[b * W + beam]))
                        continue
                    live.append((s, b * W + beam, t))
                    if len(live) == W:
                        break
                finished[b] = sorted(finished[b], key=lambda h: -h[0])[:W]
                best_live = live[0][0] / lp if live else float("-inf")
                if len(finished[b]) >= W and finished[b][-1][0] >= best_live:
                    done[b] = True
                elif not live:  # every extension was banned or ended: nothing left to extend
                    done[b] = True
            if done[b]:
                live = []
            while len(live) < W:  # filler rows for finished sources (score -inf, never extended)
                live.append((float("-inf"), b * W, pad_id))
            for s, r, t in live:
                new_scores.append(s)
                rows.append(r)
                toks.append(t)
        if all(done):
            break
        index = torch.tensor(rows, dtype=torch.long, device=device)
        state.select(index)
        seqs = [seqs[r] + [t] for r, t in zip(rows, toks)]
        scores_BW = torch.tensor(new_scores, device=device).reshape(B, W)
        tok_R = torch.tensor(toks, dtype=torch.long, device=device)
    else:
        # Out of steps: the live beams compete with the finished hypotheses at their current length.
        lp = length_penalty(steps, alpha)
        for b in range(B):
            if done[b]:
                continue
            for k in range(W):
                s = float(scores_BW[b, k])
                if s != float("-inf"):
                    finished[b].append((s / lp, seqs[b * W + k]))
    return [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]


# --------------------------------------------------------------------------------------------------
# Text level


def load_seq2seq(path: str, device: str = "cpu"):
    """(model, source tokenizer, target tokenizer, meta) of a seq2seq checkpoint, run or Marian directory.
    The tokenizers are None for an imported Marian model (its sentencepiece tokenizers are not converted)."""
    from .checkpoint import load_checkpoint, resolve
    from .finetune.seq2seq import TokenizerPair

    model, _tok, meta = load_checkpoint(path, device=device)
    if model.cfg.arch != "seq2seq":
        raise UserError(f"{path} is a {model.cfg.arch} model; this command needs an encoder-decoder (seq2seq) model")
    kind, ckpt = resolve(path)
    toks = TokenizerPair.load(ckpt) if kind == "lmforge" else None
    return model, (toks.src if toks else None), (toks.tgt if toks else None), meta


def encode_sources(src_tok, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Source ids as training made them: the text's tokens, cut to max_len - 1, then EOS."""
    eos = src_tok.eos_id
    ids = src_tok.encode_batch(list(texts))
    return [list(x[: max_len - 1]) + ([eos] if eos is not None else []) for x in ids]


def translate_texts(model, src_tok, tgt_tok, texts: Sequence[str], cfg: Seq2SeqGenerateConfig, batch_size: int = 16,
                    progress: bool = True, max_source_len: Optional[int] = None) -> list[str]:
    """Generate a target text for every source text, in batches of similar length."""
    if src_tok is None or tgt_tok is None:
        raise UserError("this model has no lmforge tokenizer (an imported Marian model keeps sentencepiece ones); "
                        "fine-tune it with `lmforge finetune seq2seq --tokenizer DIR` or decode token ids from Python")
    cfg.validate()
    limit = max_source_len or (model.cfg.block_size if model.cfg.pos == "learned" else 1024)
    sources = encode_sources(src_tok, texts, limit)
    eos = tgt_tok.eos_id
    pad = model.cfg.pad_id if model.cfg.pad_id is not None else (src_tok.pad_id or 0)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))  # less padding per batch
    outs: list[Optional[str]] = [None] * len(sources)
    batches = range(0, len(order), batch_size)
    if progress and len(order) > batch_size:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch", leave=False)
    for s in batches:
        rows = order[s:s + batch_size]
        ids = generate_seq2seq(model, [sources[i] for i in rows], cfg, eos_id=eos, pad_id=pad)
        for i, out in zip(rows, ids):
            outs[i] = tgt_tok.decode(out, skip_special_tokens=True)
    return [o or "" for o in outs]
