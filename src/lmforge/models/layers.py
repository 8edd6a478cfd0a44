"""Transformer building blocks: norms, MLPs, positional encodings, attention and the KV cache.

Shape legend (suffixes on tensor names):
    B  batch             T  query positions        S  key positions (cache + new)
    C  model width       H  query heads            K  key/value heads (grouped-query attention)
    D  head width        F  MLP hidden width       V  vocabulary
A name such as ``q_BHTD`` is the query tensor laid out as [batch, heads, positions, head width].
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig

# --------------------------------------------------------------------------------------------------
# Normalization


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * g, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 (as Llama does) so bf16 activations do not lose the small variances.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: Optional[int] = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


# --------------------------------------------------------------------------------------------------
# MLP


class MLP(nn.Module):
    """Position-wise feed-forward network. For SwiGLU (Shazeer 2020) ``fc1`` holds the gate and the up
    projection stacked as one matrix [gate; up], so one matmul computes both."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        ff = cfg.ff
        self.fc1 = nn.Linear(cfg.d_model, 2 * ff if cfg.mlp == "swiglu" else ff, bias=cfg.bias)
        self.fc2 = nn.Linear(ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        # A module, so a faster CPU kernel can be swapped in from outside (lmforge.kernels.use_cpu_kernels).
        self.act = nn.GELU(approximate="tanh") if cfg.mlp == "gelu_tanh" else None

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        h_BTF = self.fc1(x_BTC)
        if self.kind == "swiglu":
            gate_BTF, up_BTF = h_BTF.chunk(2, dim=-1)
            h_BTF = F.silu(gate_BTF) * up_BTF
        elif self.kind == "gelu":
            h_BTF = F.gelu(h_BTF)
        elif self.kind == "gelu_tanh":  # GPT-2's approximation ("gelu_new")
            h_BTF = self.act(h_BTF)
        elif self.kind == "relu":  # the original Transformer (Vaswani et al. 2017, eq. 2)
            h_BTF = F.relu(h_BTF)
        elif self.kind == "silu":  # swish (Ramachandran et al. 2017), Marian's default
            h_BTF = F.silu(h_BTF)
        else:  # relu2: squared ReLU (So et al. 2021, "Primer")
            h_BTF = F.relu(h_BTF).square()
        return self.drop(self.fc2(h_BTF))


# --------------------------------------------------------------------------------------------------
# Positional encodings


def sinusoidal_encoding(positions_BT: torch.Tensor, dim: int, layout: str = "interleave") -> torch.Tensor:
    """The original Transformer's encoding (Vaswani et al. 2017, section 3.5):
    PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(pos / 10000^(2i/dim)).
    ``layout="concat"`` puts all sines first, then all cosines (tensor2tensor, fairseq, Marian)."""
    i = torch.arange(0, dim, 2, device=positions_BT.device, dtype=torch.float32)
    inv_freq = torch.exp(-math.log(10000.0) * i / dim)
    angles_BTI = positions_BT.float()[..., None] * inv_freq
    if layout == "concat":
        return torch.cat([angles_BTI.sin(), angles_BTI.cos()], dim=-1)
    pe = torch.stack([angles_BTI.sin(), angles_BTI.cos()], dim=-1)  # interleave sin, cos
    return pe.flatten(-2)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies theta^(-2i/D) (Su et al. 2021), with optional context-extension scaling."""
    d = cfg.hd
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if cfg.rope_scaling == "linear":  # position interpolation (Chen et al. 2023)
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low frequencies by the factor, and blend
        # smoothly in between (Meta's reference implementation of "rope_scaling" type llama3).
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_ctx = cfg.rope_original_max_positions
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq.float()


def rope_cos_sin(positions_BT: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [B, 1, T, D] for the given positions, computed in fp32."""
    angles_BTI = positions_BT.float()[..., None] * inv_freq.float().to(positions_BT.device)
    angles_BTD = torch.cat([angles_BTI, angles_BTI], dim=-1)
    return angles_BTD.cos()[:, None], angles_BTD.sin()[:, None]


def apply_rope(x_BHTD: torch.Tensor, cos_B1TD: torch.Tensor, sin_B1TD: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) by position-dependent angles ("rotate half" layout, as in
    GPT-NeoX and Hugging Face Llama), so that q.k depends only on the relative position."""
    x1, x2 = x_BHTD.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_BHTD.float() * cos_B1TD + rotated.float() * sin_B1TD).to(x_BHTD.dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al. 2022): a geometric sequence starting at 2^(-8/n); for a head
    count that is not a power of two, the paper's recipe interleaves the next power's odd slopes."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values for incremental decoding: one [B, K, max_len, D] pair per layer.

    All rows share one fill length; batched prompts of different lengths are left-padded and the
    padding is hidden by a key mask, so slot distances equal position distances for real tokens."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # slots filled by previous forward calls

    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k_BKTD.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.k[layer][:, :, start:end] = k_BKTD
        self.v[layer][:, :, start:end] = v_BKTD
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (drop finished sequences, reorder beams)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


# --------------------------------------------------------------------------------------------------
# Attention


class ScaledDotProductAttention(nn.Module):
    """softmax(Q K^T / sqrt(D) + mask) V for all heads at once: torch's ``scaled_dot_product_attention``.
    A module, so a faster CPU kernel can be swapped in from outside (lmforge.kernels.use_cpu_kernels)."""

    def forward(self, q_BHTD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
                mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
        return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=is_causal)


class Attention(nn.Module):
    """Multi-head self-attention, softmax(Q K^T / sqrt(D)) V per head, heads concatenated and projected
    by W^O (Vaswani et al. 2017). With fewer key/value heads than query heads it is grouped-query
    attention (Ainslie et al. 2023): each K/V head serves n_heads / n_kv_heads query heads.

    The fast path is torch's scaled_dot_product_attention. ``need_weights=True`` takes the explicit
    path, which computes the same thing step by step and returns the attention weights."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.hd
        # q, k and v projections stacked as one matrix [W_q; W_k; W_v]: one matmul instead of three.
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                             bias=cfg.use_qkv_bias)
        self.proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.sdpa = ScaledDotProductAttention()

    def forward(self, x_BTC: torch.Tensor, *, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                mask: Optional[torch.Tensor] = None, is_causal: bool = True, cache: Optional[KVCache] = None,
                need_weights: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, T, _ = x_BTC.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q_BTHD, k_BTKD, v_BTKD = self.qkv(x_BTC).view(B, T, H + 2 * K, D).split([H, K, K], dim=2)
        q_BHTD, k_BKTD, v_BKTD = q_BTHD.transpose(1, 2), k_BTKD.transpose(1, 2), v_BTKD.transpose(1, 2)
        if self.q_norm is not None:
            q_BHTD, k_BKTD = self.q_norm(q_BHTD), self.k_norm(k_BKTD)
        if rope is not None:
            q_BHTD, k_BKTD = apply_rope(q_BHTD, *rope), apply_rope(k_BKTD, *rope)
        if cache is not None:
            k_BKSD, v_BKSD = cache.update(self.layer, k_BKTD, v_BKTD)
        else:
            k_BKSD, v_BKSD = k_BKTD, v_BKTD
        if K != H:  # share each K/V head across its group of query heads
            k_BHSD = k_BKSD.repeat_interleave(H // K, dim=1)
            v_BHSD = v_BKSD.repeat_interleave(H // K, dim=1)
        else:
            k_BHSD, v_BHSD = k_BKSD, v_BKSD
        dropout_p = self.dropout if self.training else 0.0

        weights_BHTS = None
        if need_weights:
            scores_BHTS = (q_BHTD.float() @ k_BHSD.float().transpose(-2, -1)) / math.sqrt(D)
            if mask is None and is_causal:
                mask = torch.ones(T, k_BHSD.shape[2], dtype=torch.bool, device=x_BTC.device).tril(
                    k_BHSD.shape[2] - T)
            if mask is not None:
                scores_BHTS = (scores_BHTS.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                               else scores_BHTS + mask)
            weights_BHTS = torch.softmax(scores_BHTS, dim=-1)
            y_BHTD = (F.dropout(weights_BHTS, dropout_p) @ v_BHSD.float()).to(q_BHTD.dtype)
        else:
            y_BHTD = self.sdpa(q_BHTD, k_BHSD, v_BHSD, mask, dropout_p, is_causal and mask is None)
        y_BTC = y_BHTD.transpose(1, 2).reshape(B, T, H * D)
        return self.resid_drop(self.proj(y_BTC)), weights_BHTS


def attention_mask(T: int, past: int, *, key_mask_BS: Optional[torch.Tensor] = None,
                   doc_ids_BT: Optional[torch.Tensor] = None, alibi_H: Optional[torch.Tensor] = None,
                   device: torch.device | str = "cpu") -> Optional[torch.Tensor]:
    """Build the attention mask for T new queries after ``past`` cached positions.

    Returns None when plain causal attention is enough (SDPA's ``is_causal`` fast path), else a boolean
    [B|1, 1, T, S] mask (True = may attend) or, with ALiBi, an additive float [B|1, H, T, S] mask.
    ``key_mask_BS`` hides padding keys; ``doc_ids_BT`` confines attention to the same packed document."""
    S = past + T
    if key_mask_BS is None and doc_ids_BT is None and alibi_H is None and (past == 0 or T == 1):
        return None
    q_slot = torch.arange(past, S, device=device)
    k_slot = torch.arange(S, device=device)
    allowed = (k_slot[None, :] <= q_slot[:, None])[None, None]  # [1, 1, T, S]
    if key_mask_BS is not None:
        allowed = allowed & key_mask_BS[:, None, None, :].bool()
    if doc_ids_BT is not None:
        same_doc = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]  # [B, T, T]; only without a cache
        allowed = allowed & same_doc[:, None]
    # A query always sees itself, so rows of padding queries never become all -inf (NaN).
    allowed = allowed | (k_slot[None, :] == q_slot[:, None])[None, None]
    if alibi_H is None:
        return allowed
    distance_TS = (q_slot[:, None] - k_slot[None, :]).clamp(min=0).float()
    bias_1HTS = -alibi_H.to(device)[None, :, None, None] * distance_TS[None, None]
    return bias_1HTS.masked_fill(~allowed, float("-inf"))
