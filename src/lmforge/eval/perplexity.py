"""Perplexity and bits per byte of text.

Each document is scored in windows of ``max_len`` tokens that overlap by half, so every token after the
first window has at least max_len/2 tokens of context. A document starts after the tokenizer's BOS (when
the model was trained with one) or EOS (the document separator of lmforge's pretraining data), so its first
token is scored too. Bits per byte = total negative log-likelihood in bits / UTF-8 bytes of the text: unlike
perplexity it does not depend on the tokenizer, so models with different vocabularies compare fairly.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from ..config import UserError


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents from a .txt file (the whole file), a .jsonl file (one per line) or a folder of those."""
    from ..finetune.data import read_jsonl

    p = Path(path)
    if not p.exists():
        raise UserError(f"data not found: {p}")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ".jsonl")) \
        if p.is_dir() else [p]
    docs: list[str] = []
    for f in files:
        if f.suffix == ".jsonl":
            for no, obj in read_jsonl(f):
                text = obj.get(text_field)
                if not isinstance(text, str):
                    raise UserError(f"{f} line {no}: needs a string field {text_field!r} (see --text-field)")
                if text:
                    docs.append(text)
        else:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{f}: not UTF-8 text (byte offset {e.start})") from None
            if text:
                docs.append(text)
    if not docs:
        raise UserError(f"{p} holds no text to score")
    return docs


def _windows(ids: list[int], first_target: int, block: int) -> Iterable[tuple[list[int], int]]:
    """(window ids, index in the window of its first scored target) covering targets first_target.."""
    context = block // 2
    begin, scored_to = 0, first_target
    while scored_to < len(ids):
        end = min(begin + block, len(ids))
        yield ids[begin:end], max(scored_to, begin + 1) - begin
        scored_to = end
        begin = end - context


@torch.inference_mode()
def perplexity(model, tok, docs: list[str], max_len: Optional[int] = None, batch_size: int = 8,
               progress: bool = False) -> dict:
    from ..generate import wants_bos

    block = min(max_len or model.cfg.block_size, model.cfg.block_size)
    if block < 2:
        raise UserError("max_len: perplexity needs windows of at least 2 tokens")
    start = tok.bos_id if wants_bos(tok) and tok.bos_id is not None else tok.eos_id
    windows, n_bytes = [], 0
    for text in docs:
        ids = tok.encode(text)
        if start is not None:
            ids, first = [start] + ids, 1
            n_bytes += len(text.encode("utf-8"))
        else:  # the first token has no context: neither it nor its bytes are scored
            first = 1
            n_bytes += len(text.encode("utf-8")) - len(tok.decode(ids[:1]).encode("utf-8"))
        windows += list(_windows(ids, first, block))
    device = next(model.parameters()).device
    pad = tok.pad_id if tok.pad_id is not None else 0
    model.eval()
    nll, count = 0.0, 0
    order = sorted(range(len(windows)), key=lambda i: len(windows[i][0]))  # similar lengths batch together
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch", leave=False)
    for b in batches:
        T = max(len(windows[i][0]) for i in b)
        x = torch.full((len(b), T), pad, dtype=torch.long)
        y = torch.full((len(b), T), -100, dtype=torch.long)
        for r, i in enumerate(b):
            w, first = windows[i]
            x[r, :len(w)] = torch.tensor(w)
            y[r, first - 1:len(w) - 1] = torch.tensor(w[first:])  # position t predicts token t+1
        logits = model(x.to(device)).float()
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), ignore_index=-100, reduction="sum")
        nll += float(loss)
        count += int((y != -100).sum())
    if count == 0:
        raise UserError("the text is too short to score (it needs at least 2 tokens)")
    return {"task": "perplexity", "documents": len(docs), "tokens": count, "bytes": n_bytes,
            "nll_per_token": nll / count, "perplexity": math.exp(min(nll / count, 700.0)),
            "bits_per_byte": nll / math.log(2) / max(n_bytes, 1), "window": block}
