"""The pretraining recipe: next-token prediction on prepared token shards."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import load_checkpoint, read_config, unwrap
from ..config import PretrainConfig, UserError, to_dict, write_run_yaml
from ..models.decoder import DecoderLM
from ..models.head_loss import cross_entropy
from .loop import TrainTask, load_resume_state, train


def next_token_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the next token at every position (targets -100 are ignored), "mean" or "sum".
    lmforge's decoder computes it inside its forward (through any DDP / FSDP / compile wrapper), which on
    the CPU in fp32 does so without the [B, T, V] logits (models/head_loss.py); other models return logits
    and the loss is taken on them."""
    kwargs = dict(positions_BT=batch.get("positions"), doc_ids_BT=batch.get("doc_ids"))
    if isinstance(unwrap(model), DecoderLM):
        return model(batch["x"], targets_BT=batch["y"], loss_reduction=reduction, **kwargs)
    return cross_entropy(model(batch["x"], **kwargs).flatten(0, 1), batch["y"].flatten(), reduction)


def causal_lm_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the next token at every position (targets -100 are ignored)."""
    return next_token_loss(model, batch, "mean")


def _config_diff(a, b, prefix="model") -> list[str]:
    da, db = to_dict(a), to_dict(b)
    return [f"{prefix}.{k}: checkpoint has {da[k]!r}, this run has {db.get(k)!r}" for k in da if da[k] != db.get(k)]


def resolve_model_config(cfg: PretrainConfig, data_vocab: int):
    mcfg = cfg.model
    if cfg.vocab_from_data:
        mcfg = dataclasses.replace(mcfg, vocab_size=data_vocab)
    elif mcfg.vocab_size < data_vocab:
        raise UserError(f"model.vocab_size={mcfg.vocab_size} is smaller than the data's vocabulary ({data_vocab}); "
                        f"raise it or drop --vocab-from-data false")
    return mcfg.validate()


def pretrain(cfg: PretrainConfig, log: Callable[[str], None] = print) -> Path:
    """Run (or resume) a pretraining run described by ``cfg``; returns the final checkpoint."""
    from ..data.loader import BlockSampler, ValBatches
    from ..data.shards import TokenData
    from ..tokenizer import Tokenizer

    from .distributed import init_distributed

    cfg.validate()
    info = init_distributed(cfg.train)
    if not info.is_main:
        log = lambda *_: None  # noqa: E731  only rank 0 talks
    out = Path(cfg.out)
    train_tokens = TokenData(cfg.data, "train")
    try:
        val_tokens = TokenData(cfg.data, "val")
        if len(val_tokens) == 0:
            val_tokens = None
    except UserError:
        val_tokens = None
    tokenizer = Tokenizer.load(cfg.data)
    mcfg = resolve_model_config(cfg, train_tokens.vocab_size)
    objective = None
    if cfg.objective == "mlm":  # masked-LM pretraining of an encoder: its batches and loss (train/mlm.py)
        from .mlm import MLMObjective

        objective = MLMObjective(cfg, tokenizer, train_tokens.vocab_size)
        mcfg = objective.model_config(mcfg)
    cfg = dataclasses.replace(cfg, model=mcfg)
    block = cfg.train.block_size or mcfg.block_size
    if block > mcfg.block_size:
        raise UserError(f"train.block_size={block} is beyond the model's positions (model.block_size={mcfg.block_size})")

    resume_state, found = None, None
    if cfg.resume:
        found = load_resume_state(out)
        if found is None:
            log(f"note: {out} has no checkpoint to resume from; starting a new run")
        else:
            ckpt, resume_state = found
            saved_cfg, meta = read_config(ckpt)
            diff = _config_diff(saved_cfg, mcfg)
            if diff:
                raise UserError(f"checkpoint {ckpt} does not match this run's model config ({diff[0]})")
            if meta.get("tokenizer_hash") not in (None, train_tokens.tokenizer_hash):
                raise UserError(f"checkpoint {ckpt} was trained with another tokenizer than the data in {cfg.data}")
            per_step = cfg.train.batch_size * cfg.train.grad_accum * info.world_size
            if resume_state.get("samples_per_step", per_step) != per_step:
                raise UserError(f"the global batch changed ({resume_state['samples_per_step']} samples per step in "
                                f"the checkpoint, {per_step} now); keep batch_size x grad_accum x processes equal")
            log(f"resuming from {ckpt} (step {resume_state['step']})")
    elif info.is_main and (any((out / "checkpoints").glob("step-*")) or (out / "final").exists()):
        raise UserError(f"run directory {out} already holds checkpoints; pass --resume to continue it or choose "
                        f"another --out")

    torch.manual_seed(cfg.train.seed)
    if resume_state is not None and not (ckpt / "dcp").is_dir():
        model, _, _ = load_checkpoint(ckpt)
    elif cfg.init_from:
        model, _, _ = load_checkpoint(cfg.init_from)
        diff = _config_diff(unwrap(model).cfg, mcfg)
        if diff:
            raise UserError(f"--init-from {cfg.init_from} does not match the model config ({diff[0]})")
    else:
        from ..models import build_model

        model = build_model(mcfg)

    if info.is_main:
        write_run_yaml(cfg, out)

    sampler = BlockSampler(len(train_tokens), block, cfg.train.seed)
    val_batches = None
    if val_tokens is not None and cfg.train.eval_every:
        try:
            vb = ValBatches(val_tokens, block, cfg.train.batch_size, cfg.train.eval_batches)
            val_batches = lambda: ({"x": x, "y": y} for x, y in vb)  # noqa: E731
        except UserError as e:
            log(f"note: no validation ({e})")

    def get_batch(indices: list[int]) -> dict:
        x, y = sampler.batch(train_tokens, indices)
        return {"x": x, "y": y}

    loss_fn, extra = causal_lm_loss, {"objective": "causal_lm"}
    if objective is not None:
        get_batch, val_batches, loss_fn, extra = objective.wrap(get_batch, val_batches)
    n_params = unwrap(model).num_params()
    log(f"model: {n_params / 1e6:.2f}M parameters, {mcfg.n_layers} layers, d_model {mcfg.d_model}, "
        f"vocab {mcfg.vocab_size}, context {block}; data: {len(train_tokens):,} training tokens "
        f"({sampler.num_samples:,} blocks per epoch)")
    task = TrainTask(model=model, get_batch=get_batch, loss_fn=loss_fn, tokens_per_sample=block,
                     eval_batches=val_batches, tokenizer=tokenizer,
                     extra_config={"tokenizer_hash": train_tokens.tokenizer_hash, **extra})
    return train(task, cfg.train, cfg.optim, out, resume=found, dist_info=info, log=log)
