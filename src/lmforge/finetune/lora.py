"""LoRA: low-rank adapters swapped into a model from outside (Hu et al. 2021, arXiv:2106.09685).

A frozen linear layer y = W x + b becomes y = W x + b + (alpha / r) * B (A dropout(x)), with A [r, in]
initialized like a linear layer (Kaiming-uniform) and B [out, r] at zero, so the adapted model starts
exactly at the base model. Only A and B train; the base weights stay untouched, so an adapter checkpoint
holds A and B alone (a few percent of the model, or less).

``apply_lora`` replaces the chosen ``nn.Linear`` modules of any model by ``LoRALinear`` wrappers; the
model's own forward is unchanged (house rule 3). ``merge_lora`` folds W + (alpha / r) B A back into
plain ``nn.Linear`` modules, giving a model with the original structure and the adapted function.

Names: the wrapper keeps the base layer as ``.base``, so adapter weights are saved as
``blocks.N.attn.qkv.lora_A`` / ``.lora_B`` and ``adapter_state_dict`` returns exactly those.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ..config import LoraConfig, UserError
from ..models import replace_module


class LoRALinear(nn.Module):
    """``base(x) + scaling * (dropout(x) @ A^T) @ B^T`` with ``base`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear does for its weight
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `.weight` (e.g. dtype checks) keeps working
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """The update added to the base weight: scaling * B A, [out, in]."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.drop(x) @ self.lora_A.to(x.dtype).t() @ self.lora_B.to(x.dtype).t()
        return self.base(x) + update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (in eval mode)."""
        b = self.base
        out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=b.weight.device,
                        dtype=b.weight.dtype)
        with torch.no_grad():
            out.weight.copy_((b.weight.float() + self.delta_weight()).to(b.weight.dtype))
            if b.bias is not None:
                out.bias.copy_(b.bias)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def _target_names(model: nn.Module, targets: list[str], last_blocks: int = 0) -> list[str]:
    n_blocks = len(getattr(model, "blocks", ()))
    names = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) and name.split(".")[-1] in targets):
            continue
        parts = name.split(".")
        if last_blocks and parts[0] == "blocks" and int(parts[1]) < n_blocks - last_blocks:
            continue
        names.append(name)
    return names


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Freeze every parameter of ``model`` and swap the target linear layers for LoRA wrappers (in
    place). Returns the names of the adapted layers."""
    cfg.validate()
    if cfg.rank <= 0:
        raise UserError("lora.rank: must be >= 1 to add adapters")
    tied_head = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    targets = list(cfg.targets)
    if "lm_head" in targets and tied_head:
        raise UserError("lora.targets: lm_head shares its weight with the token embedding in this model "
                        "(tied embeddings); adapt the other layers")
    for p in model.parameters():
        p.requires_grad_(False)
    names = _target_names(model, targets, cfg.layers)
    if not names:
        raise UserError(f"lora.targets: no linear layer of this model is named {', '.join(targets)}")
    for name in names:
        replace_module(model, name, LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, cfg.dropout))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def adapter_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Only the adapter weights: {"<layer>.lora_A": ..., "<layer>.lora_B": ...}."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{prefix}{name}.lora_A"] = m.lora_A.detach()
        out[f"{prefix}{name}.lora_B"] = m.lora_B.detach()
    return out


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Copy adapter weights into a model that ``apply_lora`` prepared with the same config."""
    layers = lora_layers(model)
    expected = {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    got = {k for k in state if ".lora_" in k}
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        detail = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
        raise UserError(f"{where}: adapter weights do not match its config ({detail})")
    with torch.no_grad():
        for n, m in layers.items():
            for ab in "AB":
                src, dst = state[f"{n}.lora_{ab}"], getattr(m, f"lora_{ab}")
                if tuple(src.shape) != tuple(dst.shape):
                    raise UserError(f"{where}: {n}.lora_{ab} has shape {tuple(src.shape)}, expected "
                                    f"{tuple(dst.shape)} (another base model or rank?)")
                dst.copy_(src)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA wrapper by a plain linear layer holding W + scaling * B A (in place)."""
    for name, m in list(lora_layers(model).items()):
        replace_module(model, name, m.merged())
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each tensor counted once."""
    seen, train, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        train += p.numel() if p.requires_grad else 0
    return train, total


def lora_meta(cfg: LoraConfig, base: str, layers: Optional[list[str]] = None) -> dict:
    """The ``adapter`` entry of an adapter checkpoint's config.json."""
    meta = {"type": "lora", "rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
            "targets": list(cfg.targets), "layers": cfg.layers}
    if layers is not None:
        meta["adapted"] = len(layers)
    return meta


def lora_config_from_meta(meta: dict, where: str) -> LoraConfig:
    try:
        return LoraConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]), dropout=float(meta.get("dropout", 0.0)),
                          targets=list(meta["targets"]), layers=int(meta.get("layers", 0))).validate()
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: invalid adapter config in config.json ({e})") from None


# --------------------------------------------------------------------------------------------------
# Adapter checkpoints: config.json {"format": "lmforge", "model": {...}, "adapter": {...}, "base": PATH}
# plus adapter.safetensors. ``checkpoint.load_checkpoint`` calls ``load_adapter_checkpoint`` for them.


def base_path(ckpt, meta: dict):
    """The base model an adapter checkpoint refers to (a relative path is taken from the adapter's dir)."""
    from pathlib import Path

    base = meta.get("base")
    if not base:
        raise UserError(f"adapter {ckpt}: config.json names no base model (\"base\")")
    p = Path(base)
    if not p.is_absolute() and not p.exists():
        p = Path(ckpt) / p
    if not p.exists():
        raise UserError(f"adapter {ckpt}: its base model {base} is not found; put it back or edit \"base\" in "
                        f"{Path(ckpt) / 'config.json'}")
    return p


def load_adapter_checkpoint(ckpt, meta: dict, device: str = "cpu", dtype=None, merge: bool = True):
    """(model, tokenizer) of an adapter checkpoint: the base model with the adapter applied, folded into
    plain linear layers when ``merge`` (the default; inference then costs what the base model costs)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from ..checkpoint import ADAPTER_FILE, load_checkpoint
    from ..config import to_dict

    ckpt = Path(ckpt)
    model, tokenizer, _ = load_checkpoint(base_path(ckpt, meta), device=device)
    if meta.get("model") is not None and to_dict(model.cfg) != meta["model"]:
        diff = [k for k, v in to_dict(model.cfg).items() if meta["model"].get(k) != v]
        raise UserError(f"adapter {ckpt}: its base model changed since training (model.{diff[0]} differs)")
    apply_lora(model, lora_config_from_meta(meta["adapter"], f"adapter {ckpt}"))
    weights = ckpt / ADAPTER_FILE
    if not weights.is_file():
        raise UserError(f"adapter {ckpt}: {ADAPTER_FILE} is missing")
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise UserError(f"adapter {ckpt}: cannot read {ADAPTER_FILE} ({e})") from None
    load_adapter_state(model, state, f"adapter {ckpt}")
    if merge:
        merge_lora(model)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    if (ckpt / "tokenizer.json").is_file():
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.load(ckpt)
    return model, tokenizer


def merge_adapter(adapter: str, out: str):
    """`lmforge merge ADAPTER --out CKPT`: write a plain checkpoint whose weights are base + adapter (a
    classifier keeps its head and labels). Returns the checkpoint directory."""
    from pathlib import Path

    from safetensors.torch import load_file

    from ..checkpoint import ADAPTER_FILE, HEAD_PREFIXES, clean_state_dict, load_checkpoint, save_checkpoint

    model, tokenizer, meta = load_checkpoint(adapter)
    if not meta.get("adapter"):
        raise UserError(f"{meta.get('path', adapter)} is not a LoRA adapter checkpoint (its config.json has no "
                        f"\"adapter\"); nothing to merge")
    ckpt = Path(meta["path"])
    state = clean_state_dict(model)
    state.update({k: v for k, v in load_file(str(ckpt / ADAPTER_FILE)).items() if k.startswith(HEAD_PREFIXES)})
    keep = {k: v for k, v in meta.items() if k not in ("format", "version", "model", "path", "adapter", "base",
                                                      "generation", "step")}
    keep["merged_from"] = str(ckpt.resolve())
    return save_checkpoint(out, model, tokenizer=tokenizer, extra=keep, state_dict=state,
                           generation=meta.get("generation"))
