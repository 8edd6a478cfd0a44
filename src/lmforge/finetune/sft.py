"""Supervised fine-tuning on instructions and conversations (SFT), fully or with LoRA.

The step function is next-token cross-entropy over the assistant tokens only (the loss mask built in
``data.encode_conversation``); prompts, system messages and padding are context, never targets. It is
summed per batch and the training loop divides by the step's target count over all micro-batches and
processes (``TrainTask.loss_terms``), so each assistant token weighs the same whatever the
accumulation and process count. Packed rows pass ``positions`` and ``doc_ids`` to the model so each example sees only itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import FinetuneConfig


def sft_loss_sum(model, batch: dict) -> torch.Tensor:
    """Cross-entropy summed over the batch's target tokens (labels -100 are context)."""
    from ..train.pretrain import next_token_loss

    return next_token_loss(model, batch, "sum")


def target_count(batch: dict) -> int:
    """The number of target tokens of a batch (the terms ``sft_loss_sum`` sums)."""
    return int((batch["y"] != -100).sum())


def per_example_loss(model, batch: dict) -> torch.Tensor:
    """Summed target-token loss per example of a batch (packed or not): [n_examples], row-major order.
    Used to check that packing changes nothing."""
    logits_BTV = model(batch["x"], positions_BT=batch.get("positions"), doc_ids_BT=batch.get("doc_ids"))
    tok_BT = F.cross_entropy(logits_BTV.transpose(1, 2).float(), batch["y"], ignore_index=-100, reduction="none")
    doc = batch.get("doc_ids")
    out = []
    for b in range(tok_BT.shape[0]):
        if doc is None:
            out.append(tok_BT[b].sum())
        else:
            for d in torch.unique(doc[b][doc[b] >= 0]).tolist():
                out.append(tok_BT[b][doc[b] == d].sum())
    return torch.stack(out)


def finetune_sft(cfg: FinetuneConfig, log: Callable[[str], None] = print) -> Path:
    """`lmforge finetune sft`: returns the final checkpoint (a full model, or a LoRA adapter)."""
    import dataclasses

    from .data import SFTBatches, load_sft_examples, read_conversations, split_holdout
    from .recipe import Base, run_task

    if cfg.task != "sft":
        cfg = dataclasses.replace(cfg, task="sft")
    cfg.validate()
    convs = read_conversations(cfg.data, cfg.system)  # bad data fails before the model loads
    val_convs = read_conversations(cfg.val_data, cfg.system) if cfg.val_data else None
    base = Base(cfg, log)
    tok, max_len = base.tokenizer, base.max_len
    examples = load_sft_examples(cfg.data, tok, max_len, log=log, conversations=convs)
    if val_convs is not None:
        val = load_sft_examples(cfg.val_data, tok, max_len, log=log, conversations=val_convs)
    else:
        tr, va = split_holdout(len(examples), cfg.val_fraction, cfg.train.seed)
        examples, val = [examples[i] for i in tr], [examples[i] for i in va]
    pad = tok.pad_id if tok.pad_id is not None else 0
    train_b = SFTBatches(examples, max_len, pad, packed=cfg.pack, seed=cfg.train.seed)
    eval_batches = None
    if val and cfg.train.eval_every:
        fixed = SFTBatches(val, max_len, pad, packed=cfg.pack).fixed_batches(cfg.train.batch_size,
                                                                           cfg.train.eval_batches)
        eval_batches = lambda: iter(fixed)  # noqa: E731
    base.describe(base.lm, log)
    tokens = sum(len(e) for e in examples)
    log(f"data: {len(examples):,} training examples ({tokens:,} tokens, {train_b.target_tokens():,} of them "
        f"targets) in {len(train_b):,} {'packed rows' if cfg.pack else 'rows'} of up to {max_len} tokens; "
        f"{len(val):,} validation examples")
    return run_task(base, base.lm, train_b.get_batch, sft_loss_sum, max_len, eval_batches,
                    base.extra(max_len=max_len), log=log, loss_terms=target_count)
