"""Optimizers. AdamW with decay / no-decay parameter groups; Muon for hidden matrices."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ..config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); never biases or norm gains, whose decay only
    fights the normalization (Loshchilov & Hutter 2019; as in GPT-2 and nanoGPT)."""
    decay, no_decay, seen = [], [], set()
    for _name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # a tied embedding/head appears once
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "kind": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "kind": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    fused = cfg.fused if cfg.fused is not None else device_type in ("cuda", "cpu")
    groups = param_groups(model, cfg.weight_decay)
    for g in groups:
        g["lr"] = cfg.lr
        g["base_lr"] = cfg.lr
    if cfg.name == "muon":
        from .muon import build_muon

        return build_muon(model, cfg)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if fused:
        kwargs["fused"] = True
    else:
        # foreach batches kernel launches, which pays on accelerators; on the CPU the per-tensor loop is
        # about 2x faster than foreach (bench/train_step.py). The fused kernel (the default on the CPU and
        # CUDA) is faster still: one pass over each tensor instead of a chain of elementwise ops.
        kwargs["foreach"] = device_type != "cpu"
    return torch.optim.AdamW(groups, **kwargs)


def _takes_grad_scale(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
    """Whether ``optimizer.step`` divides the gradients by ``optimizer.grad_scale`` in its own pass: torch's
    fused Adam and AdamW do (the hook torch's GradScaler uses). Taken for plain CPU tensors (not FSDP's
    DTensors), where the saved pass is measured (bench.train_step) and tested; on a GPU the pass is a small
    share of the step."""
    if not (isinstance(optimizer, torch.optim.Adam) or isinstance(optimizer, torch.optim.AdamW)):
        return False
    if not getattr(optimizer, "_step_supports_amp_scaling", False) or hasattr(optimizer, "grad_scale"):
        return False
    if not all(g.get("fused") for g in optimizer.param_groups) or not hasattr(torch.nn.utils, "get_total_norm"):
        return False  # get_total_norm: torch 2.6 and later
    # The scale divides every gradient the optimizer steps, so those must be exactly the ones clipped.
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"] if p.grad is not None}
    if stepped != {id(p) for p in params}:
        return False
    return all((type(p) is torch.Tensor or type(p) is nn.Parameter) and p.device.type == "cpu" for p in params)


def clip_and_step(optimizer: torch.optim.Optimizer, params, max_norm: float,
                  scaler: Optional[torch.amp.GradScaler] = None) -> Optional[float]:
    """``clip_grad_norm_(params, max_norm)`` (when max_norm > 0) then ``optimizer.step()``; returns the
    gradients' total norm before clipping (None without clipping).

    With a GradScaler (fp16 training, whose loss was scaled before the backward) the gradients are unscaled
    first, the step is skipped when they hold an inf or nan (the norm returned is then not finite), and the
    scale is updated, as torch's GradScaler recipe does.

    Clipping multiplies every gradient by ``max_norm / norm`` when the norm is over the limit: a pass over
    all the gradients (for GPT-2 124M, 500 MB read and written) before the optimizer's own pass over them.
    torch's fused Adam/AdamW divides each gradient by ``optimizer.grad_scale`` inside its pass, so there the
    factor travels as that scale and the extra pass is skipped; under the limit nothing is multiplied at all.
    The update is the same to fp32 rounding, and the gradients are left clipped, as clip_grad_norm_ leaves
    them. Other optimizers and devices, FSDP's sharded parameters, a ``params`` that is not every parameter
    the optimizer steps, torch before 2.6 and a non-finite norm take clip_grad_norm_."""
    params = [p for p in params if p.grad is not None]
    if scaler is not None:
        scaler.unscale_(optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if max_norm > 0 else None
        scaler.step(optimizer)
        scaler.update()
        return norm
    if max_norm <= 0:
        optimizer.step()
        return None
    if not _takes_grad_scale(optimizer, params):
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        optimizer.step()
        return norm
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = float(total)
    if not math.isfinite(norm):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        return norm
    if max_norm / (norm + 1e-6) >= 1.0:  # clip_grad_norm_'s factor, clamped at 1: nothing to scale
        optimizer.step()
        return norm
    optimizer.grad_scale = ((total + 1e-6) / max_norm).to(torch.float32)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
    return norm
