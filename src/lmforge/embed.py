"""Sentence embeddings from an encoder: `lmforge embed MODEL --input FILE --out FILE.npy|.jsonl`.

Each text is tokenized (wrapped in [CLS] ... [SEP] when the tokenizer has those tokens, as BERT's own
tokenizer does), run through the encoder, and its last hidden states are averaged over the real tokens
(padding excluded): the mean pooling that sentence-transformers models such as all-MiniLM-L6-v2 are
trained with (Reimers & Gurevych 2019). ``normalize`` scales each vector to unit length, which is what that
model's Normalize module adds (cosine similarity then equals the dot product).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .config import EmbedConfig, UserError


def wrap_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) special ids BERT-style tokenizers put around a sentence: [CLS] ... [SEP]."""
    for cls_tok, sep_tok in (("[CLS]", "[SEP]"), ("<s>", "</s>")):
        c, s = tokenizer.token_to_id(cls_tok), tokenizer.token_to_id(sep_tok)
        if c is not None and s is not None:
            return [int(c)], [int(s)]
    return [], []


def load_encoder(path: str, device: str = "cpu"):
    from .checkpoint import load_checkpoint

    model, tokenizer, _meta = load_checkpoint(path, device=device)
    if model.cfg.arch != "encoder":
        raise UserError(f"{path} is a {model.cfg.arch} model; embeddings need an encoder (BERT-style) model")
    if tokenizer is None:
        raise UserError(f"{path} has no tokenizer (tokenizer.json); embeddings need one")
    return model, tokenizer


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32, max_len: Optional[int] = None,
                normalize: bool = False, progress: bool = False) -> np.ndarray:
    """float32 [N, C] mean-pooled embeddings of the texts."""
    model.eval()
    if not texts:
        raise UserError("no texts to embed")
    limit = max_len or model.cfg.block_size
    pre, post = wrap_ids(tokenizer)
    room = limit - len(pre) - len(post)
    if room < 1:
        raise UserError(f"max_len {limit} leaves no room for text between the special tokens")
    ids = [pre + list(x[:room]) + post for x in tokenizer.encode_batch(list(texts))]
    pad = model.cfg.pad_id if model.cfg.pad_id is not None else (tokenizer.pad_id or 0)
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    out = np.zeros((len(ids), model.cfg.d_model), dtype=np.float32)
    batches = range(0, len(order), batch_size)
    if progress and len(order) > batch_size:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="embed", unit="batch", leave=False)
    for s in batches:
        rows = order[s:s + batch_size]
        T = max(max(len(ids[i]) for i in rows), 1)
        x_BT = torch.full((len(rows), T), pad, dtype=torch.long)
        m_BT = torch.zeros((len(rows), T), dtype=torch.bool)
        for r, i in enumerate(rows):
            x_BT[r, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
            m_BT[r, : len(ids[i])] = True
        e_BC = model(x_BT.to(device), key_mask_BT=m_BT.to(device), head="mean").float()
        if normalize:
            e_BC = torch.nn.functional.normalize(e_BC, dim=-1)
        out[rows] = e_BC.cpu().numpy()
    return out


def read_texts(path: str, field: str = "text") -> list[str]:
    from .cli_seq2seq import read_sources

    return read_sources(path, field)


def embed_file(cfg: EmbedConfig) -> tuple[int, int]:
    """Embed every text of cfg.input into cfg.out; returns (count, dimension)."""
    cfg.validate()
    texts = read_texts(cfg.input, cfg.text_field)
    model, tokenizer = load_encoder(cfg.model, device=cfg.device)
    emb = embed_texts(model, tokenizer, texts, batch_size=cfg.batch_size, max_len=cfg.max_len,
                      normalize=cfg.normalize, progress=True)
    out = Path(cfg.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if cfg.out.endswith(".npy"):
            np.save(out, emb)
        else:
            with open(out, "w", encoding="utf-8") as f:
                for t, e in zip(texts, emb):
                    f.write(json.dumps({"text": t, "embedding": [round(float(v), 7) for v in e]},
                                       ensure_ascii=False) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from None
    return emb.shape[0], emb.shape[1]
