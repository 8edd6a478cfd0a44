"""A minimal plain-PyTorch GPT-2-style model and training step: the baseline the benchmarks measure
lmforge against. Deliberately the simplest fast code one would write by hand (one fused qkv matmul,
torch's scaled_dot_product_attention, pre-norm blocks, tied embeddings, AdamW with decay groups,
gradient clipping), so "lmforge >= 1.0x reference" means the library adds no overhead of its own.

It is written for this benchmark, independently of lmforge's model code, and has no lmforge imports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RefConfig:
    vocab_size: int = 65
    block_size: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    bias: bool = False
    gelu_approx: str = "none"  # GPT-2 uses "tanh"; nanoGPT's char model uses exact GELU


class RefBlock(nn.Module):
    def __init__(self, c: RefConfig):
        super().__init__()
        self.n_heads = c.n_heads
        self.ln1 = nn.LayerNorm(c.d_model, bias=c.bias)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=c.bias)
        self.proj = nn.Linear(c.d_model, c.d_model, bias=c.bias)
        self.ln2 = nn.LayerNorm(c.d_model, bias=c.bias)
        self.fc = nn.Linear(c.d_model, 4 * c.d_model, bias=c.bias)
        self.fc_out = nn.Linear(4 * c.d_model, c.d_model, bias=c.bias)
        self.approx = c.gelu_approx

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate=self.approx))


class RefGPT(nn.Module):
    def __init__(self, c: RefConfig):
        super().__init__()
        self.c = c
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.block_size, c.d_model)
        self.blocks = nn.ModuleList(RefBlock(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model, bias=c.bias)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * c.n_layers) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def ref_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1, betas=(0.9, 0.99)):
    """AdamW, decay on matrices only; torch's default implementation choice for the device."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


def ref_step(model, opt, x, y, clip: float = 1.0, loss_fn=None) -> float:
    """One training step: forward, backward, clip, AdamW. ``loss_fn(model, x, y)`` for foreign models."""
    loss = model(x, y) if loss_fn is None else loss_fn(model, x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())
