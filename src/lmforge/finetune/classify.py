"""Sequence classification: a linear head on the decoder's hidden state at the last non-pad token.

A causal decoder's last position has seen the whole text, so its hidden state (after the final norm) is
the text's summary; a linear layer maps it to class logits (the approach of GPT-1's classification
fine-tuning, Radford et al. 2018, and of ``*ForSequenceClassification`` in transformers). Texts are
right-padded, so causal attention never lets a real token see padding and no key mask is needed; the
head reads the last text token (see ``data.encode_texts`` for why not an appended EOS).

The hidden state is taken with a forward hook on the model's final norm, from outside (house rule 3):
the hook keeps only each row's last real position, so the LM head then runs on one position per row.

Checkpoint: the language model as usual (or its LoRA adapter), plus ``cls_head.weight`` / ``cls_head.bias``
in the same weights file, and in config.json ``"task": "classify"`` and ``"labels"``. ``load_checkpoint``
skips the head (the checkpoint still loads as a language model); ``load_classifier`` restores both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import FinetuneConfig, UserError

HEAD_PREFIX = "cls_head."


class SequenceClassifier(nn.Module):
    """A DecoderLM and a linear head on its last real token: (ids [B, T], lengths [B]) -> logits [B, K]."""

    def __init__(self, lm: nn.Module, num_labels: int):
        super().__init__()
        self.lm = lm
        self.cfg = lm.cfg
        p = next(lm.parameters())
        self.cls_head = nn.Linear(lm.cfg.d_model, num_labels, device=p.device, dtype=p.dtype)
        nn.init.normal_(self.cls_head.weight, std=0.02)
        nn.init.zeros_(self.cls_head.bias)

    def hidden(self, idx_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden state at position lengths-1 of each row: [B, C]."""
        B = idx_BT.shape[0]
        rows = torch.arange(B, device=idx_BT.device)
        captured: dict = {}

        def keep_last(_module, _inputs, out_BTC):
            h_BC = out_BTC[rows, lengths_B - 1]
            captured["h"] = h_BC
            return h_BC[:, None]  # the LM head then computes one position per row only

        handle = self.lm.norm_f.register_forward_hook(keep_last)
        try:
            self.lm(idx_BT)
        finally:
            handle.remove()
        return captured["h"]

    def forward(self, idx_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        h_BC = self.hidden(idx_BT, lengths_B)
        return self.cls_head(h_BC.to(self.cls_head.weight.dtype))


def make_loss(weights: Optional[torch.Tensor]) -> Callable:
    def classify_loss(model, batch: dict) -> torch.Tensor:
        logits_BK = model(batch["x"], batch["lengths"]).float()
        w = weights.to(logits_BK.device) if weights is not None else None
        return F.cross_entropy(logits_BK, batch["labels"], weight=w)

    return classify_loss


def balanced_weights(labels: list[int], k: int) -> torch.Tensor:
    """n / (k * count_c) per class (scikit-learn's "balanced"); a class absent from training gets 1."""
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=k).float()
    w = len(labels) / (k * counts.clamp(min=1))
    return torch.where(counts > 0, w, torch.ones_like(w))


# --------------------------------------------------------------------------------------------------
# Prediction and loading


@torch.inference_mode()
def predict(model: SequenceClassifier, tok, texts: list[str], max_len: int, batch_size: int = 16,
            progress: bool = False, suffix: str = "") -> list[int]:
    from .data import ClassifyBatches, encode_texts

    model.eval()
    ids = encode_texts(tok, texts, max_len, suffix)
    batches = ClassifyBatches(ids, [0] * len(ids), tok.pad_id if tok.pad_id is not None else 0)
    device = next(model.parameters()).device
    preds: list[int] = []
    it = batches.fixed_batches(batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="classify", unit="batch", leave=False)
    for b in it:
        logits = model(b["x"].to(device), b["lengths"].to(device))
        preds += logits.argmax(-1).tolist()
    return preds


def load_classifier(path: str | Path, device: str = "cpu"):
    """(SequenceClassifier, tokenizer, labels, meta) from a classification checkpoint, run or adapter."""
    from safetensors.torch import load_file

    from ..checkpoint import ADAPTER_FILE, load_checkpoint

    lm, tok, meta = load_checkpoint(path, device=device)
    labels = meta.get("labels")
    if meta.get("task") != "classify" or not isinstance(labels, list) or not labels:
        raise UserError(f"{meta.get('path', path)} is not a classifier (config.json has no \"task\": \"classify\" "
                        f"and \"labels\"); train one with `lmforge finetune classify`")
    ckpt = Path(meta["path"])
    weights = ckpt / (ADAPTER_FILE if meta.get("adapter") else "model.safetensors")
    state = {k[len(HEAD_PREFIX):]: v for k, v in load_file(str(weights), device=str(device)).items()
             if k.startswith(HEAD_PREFIX)}
    model = SequenceClassifier(lm, len(labels))
    try:
        model.cls_head.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{ckpt}: classification head does not match its {len(labels)} labels ({e})") from None
    model.eval()
    if tok is None:
        raise UserError(f"{ckpt} has no tokenizer")
    return model, tok, list(labels), meta


# --------------------------------------------------------------------------------------------------
# The recipe


def finetune_classify(cfg: FinetuneConfig, log: Callable[[str], None] = print) -> Path:
    """`lmforge finetune classify`: train the head (and the LM or its adapters); returns the final checkpoint
    and writes the held-out metrics to RUN/eval.json."""
    from ..eval.metrics import classification_report
    from ..eval.report import format_classification, write_json
    from .data import ClassifyBatches, encode_texts, label_ids, read_labeled, split_holdout
    from .recipe import Base, run_task

    cfg = cfg.validate() if cfg.task == "classify" else _with_task(cfg).validate()
    train_ex = read_labeled(cfg.data, cfg.text_field, cfg.label_field)
    if cfg.val_data:
        val_ex = read_labeled(cfg.val_data, cfg.text_field, cfg.label_field)
    else:
        tr, va = split_holdout(len(train_ex), cfg.val_fraction, cfg.train.seed)
        train_ex, val_ex = [train_ex[i] for i in tr], [train_ex[i] for i in va]
    base = Base(cfg, log)
    saved_labels = base.ckpt_meta.get("labels")
    labels = list(cfg.labels) or saved_labels or sorted({e.label for e in train_ex})
    if saved_labels and labels != saved_labels:
        raise UserError(f"checkpoint has the labels {saved_labels}, this run {labels}; keep --labels as it was")
    if len(labels) < 2:
        raise UserError(f"{cfg.data}: classification needs at least 2 labels, found {labels}")
    y_train, y_val = label_ids(train_ex, labels), label_ids(val_ex, labels)
    tok, max_len = base.tokenizer, base.max_len
    pad = tok.pad_id if tok.pad_id is not None else 0
    saved_suffix = base.ckpt_meta.get("suffix")
    if saved_suffix and cfg.suffix and cfg.suffix != saved_suffix:
        raise UserError(f"checkpoint was trained with --suffix {saved_suffix!r}, this run gives {cfg.suffix!r}; "
                        f"keep the suffix (or leave --suffix out to use the checkpoint's)")
    suffix = cfg.suffix or saved_suffix or ""
    train_b = ClassifyBatches(encode_texts(tok, [e.text for e in train_ex], max_len, suffix), y_train, pad,
                              cfg.train.seed)
    val_b = ClassifyBatches(encode_texts(tok, [e.text for e in val_ex], max_len, suffix), y_val, pad) \
        if val_ex else None

    model = SequenceClassifier(base.lm, len(labels))
    head_state = base.resumed_head(HEAD_PREFIX)
    if head_state is not None:
        model.cls_head.load_state_dict(head_state)
    weights = balanced_weights(y_train, len(labels)) if cfg.class_weights == "balanced" else None
    base.describe(model, log)
    log(f"data: {len(train_ex):,} training and {len(val_ex):,} validation texts, {len(labels)} labels "
        f"({', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''}), up to {max_len} tokens each")
    eval_batches = None
    if val_b is not None and cfg.train.eval_every:
        fixed = val_b.fixed_batches(cfg.train.batch_size, cfg.train.eval_batches)
        eval_batches = lambda: iter(fixed)  # noqa: E731
    extra = base.extra(task="classify", labels=labels, max_len=max_len, suffix=suffix)
    final = run_task(base, model, train_b.get_batch, make_loss(weights), max_len, eval_batches, extra,
                     head=("cls_head.", model.cls_head), log=log)

    if val_ex and (final / "config.json").is_file() and cfg.train.stop_after == 0:
        preds = predict(model, tok, [e.text for e in val_ex], max_len, batch_size=cfg.train.batch_size * 2,
                        suffix=suffix)
        report = classification_report(y_val, preds, labels)
        write_json(Path(cfg.out) / "eval.json", {"task": "classify", "model": str(final), "data": "validation",
                                                  **report})
        log(format_classification(report))
    return final


def _with_task(cfg: FinetuneConfig) -> FinetuneConfig:
    import dataclasses

    return dataclasses.replace(cfg, task="classify")
