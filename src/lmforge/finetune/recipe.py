"""What every fine-tuning recipe shares: the base model, LoRA or full fine-tuning, the run directory,
resume, and handing a ``TrainTask`` to the one training loop (``lmforge.train.loop.train``).

A recipe (sft.py, classify.py) supplies the data, the loss step and, for a task head, the head module;
this module decides what a checkpoint holds:

    full fine-tuning   model.safetensors: the whole language model (+ cls_head.* for a classifier)
    LoRA               adapter.safetensors: lora_A / lora_B of each adapted layer (+ cls_head.*), and in
                       config.json "adapter" (the LoRA config) and "base" (the base model's path)

Either way config.json also names the objective ("objective") and, for a classifier, "task" and "labels".
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..checkpoint import ADAPTER_FILE, clean_state_dict, load_checkpoint, read_config, resolve, unwrap
from ..config import FinetuneConfig, UserError, write_run_yaml
from .lora import adapter_state_dict, apply_lora, load_adapter_state, lora_meta, trainable_parameters



class Base:
    """The base model of a fine-tuning run, loaded (or, on resume, restored from the run's checkpoint)."""

    def __init__(self, cfg: FinetuneConfig, log: Callable[[str], None] = print):
        from ..train.distributed import init_distributed

        self.cfg = cfg
        self.info = init_distributed(cfg.train)  # torchrun: join the process group; else one process
        if not self.info.is_main:
            log = lambda *_: None  # noqa: E731  only rank 0 talks
        self.out = Path(cfg.out)
        kind, path = resolve(cfg.model)
        self.ref = str(Path(path).resolve())  # what an adapter checkpoint's "base" points to
        self.resume: Optional[tuple[Path, dict]] = None
        self.ckpt_meta: dict = {}
        if cfg.resume:
            from ..train.loop import load_resume_state

            self.resume = load_resume_state(self.out)
            if self.resume is None:
                log(f"note: {self.out} has no checkpoint to resume from; starting a new run")
        elif self.info.is_main and (any((self.out / "checkpoints").glob("step-*")) or (self.out / "final").exists()):
            raise UserError(f"run directory {self.out} already holds checkpoints; pass --resume to continue it or "
                            f"choose another --out")
        if self.resume is not None:
            ckpt, state = self.resume
            _, self.ckpt_meta = read_config(ckpt)
            saved_lora = self.ckpt_meta.get("adapter")
            if bool(saved_lora) != bool(cfg.lora.rank):
                raise UserError(f"checkpoint {ckpt} was trained {'with' if saved_lora else 'without'} LoRA; keep "
                                f"--lora.rank as it was ({saved_lora['rank'] if saved_lora else 0})")
            now = lora_meta(cfg.lora, self.ref)
            if saved_lora and now != {k: saved_lora.get(k) for k in now}:
                raise UserError(f"checkpoint {ckpt} has another LoRA config ({saved_lora}); keep the lora.* options")
            if self.ckpt_meta.get("base_model", self.ref) != self.ref:
                raise UserError(f"checkpoint {ckpt} fine-tunes {self.ckpt_meta['base_model']}, not {self.ref}; "
                                f"pass that --model")
            if self.ckpt_meta.get("objective") not in (None, cfg.task):
                raise UserError(f"checkpoint {ckpt} was trained for {self.ckpt_meta['objective']!r}, not {cfg.task!r}")
            per_step = cfg.train.batch_size * cfg.train.grad_accum * self.info.world_size
            if state.get("samples_per_step", per_step) != per_step:
                raise UserError(f"the global batch changed ({state['samples_per_step']} samples per step in the "
                                f"checkpoint, {per_step} now); keep batch_size x grad_accum x processes equal")
            log(f"resuming from {ckpt} (step {state['step']})")

        torch.manual_seed(cfg.train.seed)
        # Full fine-tuning resumes from the checkpoint's weights; LoRA from the base plus the saved adapter.
        src = self.resume[0] if (self.resume is not None and not cfg.lora.rank) else cfg.model
        self.lm, self.tokenizer, _ = load_checkpoint(src)
        self.lm = unwrap(self.lm)
        if self.tokenizer is None:
            raise UserError(f"{cfg.model} has no tokenizer (tokenizer.json); fine-tuning needs one")
        for p in self.lm.parameters():
            p.requires_grad_(True)
        self.lora_layers: list[str] = []
        if cfg.lora.rank:
            self.lora_layers = apply_lora(self.lm, cfg.lora)
            if self.resume is not None:
                load_adapter_state(self.lm, self._load_weights(self.resume[0], ADAPTER_FILE), str(self.resume[0]))

    @property
    def max_len(self) -> int:
        block = self.lm.cfg.block_size
        n = self.cfg.max_len or min(block, 1024)
        if n > block:
            raise UserError(f"max_len={n} is beyond the model's context window (block_size={block})")
        return n

    @staticmethod
    def _load_weights(ckpt: Path, name: str) -> dict:
        from safetensors.torch import load_file

        try:
            return load_file(str(ckpt / name))
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"checkpoint {ckpt}: cannot read {name} ({e})") from None

    def resumed_head(self, prefix: str) -> Optional[dict]:
        """A task head's weights from the checkpoint being resumed (keys without ``prefix``)."""
        if self.resume is None:
            return None
        state = self._load_weights(self.resume[0], ADAPTER_FILE if self.cfg.lora.rank else "model.safetensors")
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    def state_fn(self, head: Optional[tuple[str, nn.Module]] = None) -> Callable[[nn.Module], dict]:
        """What a checkpoint saves: the adapters (LoRA) or the whole LM, plus a head's weights."""
        lm, lora = self.lm, bool(self.cfg.lora.rank)

        def state(_model: nn.Module) -> dict:
            sd = adapter_state_dict(lm) if lora else clean_state_dict(lm)
            if head is not None:
                prefix, module = head
                sd.update({prefix + k: v.detach() for k, v in module.state_dict().items()})
            return sd

        return state

    def extra(self, **more) -> dict:
        extra = {"objective": self.cfg.task, "base_model": self.ref}
        if self.cfg.lora.rank:
            extra["adapter"] = lora_meta(self.cfg.lora, self.ref, self.lora_layers)
            extra["base"] = self.ref
        extra.update(more)
        return extra

    def describe(self, model: nn.Module, log: Callable[[str], None]) -> None:
        n_train, n_total = trainable_parameters(model)
        how = f"LoRA rank {self.cfg.lora.rank} on {len(self.lora_layers)} layers" if self.cfg.lora.rank else \
            "full fine-tuning"
        log(f"model: {n_total / 1e6:.2f}M parameters, {how}: {n_train:,} trainable ({100 * n_train / n_total:.2f}%)")


def run_task(base: Base, model: nn.Module, get_batch, loss_fn, tokens_per_sample: int, eval_batches,
             extra: dict, head: Optional[tuple[str, nn.Module]] = None, log: Callable[[str], None] = print,
             loss_terms: Optional[Callable[[dict], int]] = None) -> Path:
    """Hand the task to the one training loop; returns the final checkpoint (or the last one written)."""
    from ..train.loop import TrainTask, train

    cfg = base.cfg
    if base.info.is_main:
        write_run_yaml(cfg, base.out)
    task = TrainTask(model=model, get_batch=get_batch, loss_fn=loss_fn, tokens_per_sample=tokens_per_sample,
                     eval_batches=eval_batches, tokenizer=base.tokenizer, extra_config=extra,
                     trainable=base.state_fn(head), weights_file=ADAPTER_FILE if cfg.lora.rank else "model.safetensors",
                     loss_terms=loss_terms)
    return train(task, cfg.train, cfg.optim, base.out, resume=base.resume, dist_info=base.info, log=log)


def with_task(cfg: FinetuneConfig, task: str) -> FinetuneConfig:
    return dataclasses.replace(cfg, task=task)

