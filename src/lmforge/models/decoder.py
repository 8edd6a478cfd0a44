"""Decoder-only Transformer language model.

One module covers the GPT-2 family (learned absolute positions, LayerNorm, GELU, biases, tied
embeddings; Radford et al. 2019), the Llama family and its relatives Mistral and Qwen2 (RoPE, RMSNorm,
SwiGLU, no biases, grouped-query attention; Touvron et al. 2023), the original Transformer's sinusoidal
positions (Vaswani et al. 2017) and ALiBi (Press et al. 2022), all chosen by ``ModelConfig``.

Every block is pre-norm: x + Attn(Norm(x)), then x + MLP(Norm(x)) (GPT-2 and Llama both do this; it
trains stably without warmup tricks, Xiong et al. 2020). Shape legend: see layers.py.

Parameter names (the checkpoint contract, used by the converters in interop/):
    tok_emb.weight [V, C]            pos_emb.weight [block_size, C]   (learned positions only)
    blocks.N.norm1 / norm2           .weight [C] (+ .bias for LayerNorm with bias)
    blocks.N.attn.qkv.weight         [(H + 2K) * D, C]   rows: queries, then keys, then values
    blocks.N.attn.proj.weight        [C, H * D]
    blocks.N.attn.q_norm / k_norm    .weight [D]        (qk_norm only)
    blocks.N.mlp.fc1.weight          [F, C], or [2F, C] = [gate; up] for SwiGLU
    blocks.N.mlp.fc2.weight          [C, F]
    norm_f.weight                    [C]
    lm_head.weight [V, C]            (absent from checkpoints when tied to tok_emb)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ..config import ModelConfig
from .head_loss import TiedGradient, cross_entropy, fused_loss_applies, linear_cross_entropy, tied_lookup
from .layers import (MLP, Attention, KVCache, alibi_slopes, attention_mask, make_norm, rope_cos_sin,
                     rope_inv_freq, sinusoidal_encoding)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x_BTC, *, rope=None, mask=None, is_causal=True, cache=None, need_weights=False):
        a_BTC, weights = self.attn(self.norm1(x_BTC), rope=rope, mask=mask, is_causal=is_causal, cache=cache,
                                   need_weights=need_weights)
        x_BTC = x_BTC + a_BTC
        x_BTC = x_BTC + self.mlp(self.norm2(x_BTC))
        return x_BTC, weights


class DecoderLM(nn.Module):
    """A causal language model: token ids [B, T] -> next-token logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.pos_emb = nn.Embedding(cfg.block_size, C) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Not persistent: derived from the config, so they are not part of the checkpoint.
        self.register_buffer("rope_inv_freq", None, persistent=False)
        self.register_buffer("alibi_slopes", None, persistent=False)
        self.reinit_buffers()
        self.reset_parameters()

    def reinit_buffers(self) -> None:
        """Recompute the derived buffers (after ``to_empty`` from the meta device, say)."""
        device = self.tok_emb.weight.device  # under torch.device("meta") these stay meta until to_empty
        if self.cfg.pos == "rope":
            self.rope_inv_freq = rope_inv_freq(self.cfg).to(device)
        if self.cfg.pos == "alibi":
            self.alibi_slopes = alibi_slopes(self.cfg.n_heads).to(device)

    # ----------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 initialization: N(0, 0.02) weights, zero biases, and residual output projections
        scaled by 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm gains
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self, include_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied head is counted once
        if not include_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def new_cache(self, batch: int, max_len: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.kv_heads, max_len or self.cfg.block_size, self.cfg.hd,
                       p.device, dtype or p.dtype)

    # ----------------------------------------------------------------------------------------------
    def forward(self, idx_BT: torch.Tensor, *, positions_BT: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, key_mask_BS: Optional[torch.Tensor] = None,
                doc_ids_BT: Optional[torch.Tensor] = None, last_only: bool = False,
                output_attentions: bool = False, targets_BT: Optional[torch.Tensor] = None,
                loss_reduction: str = "mean"):
        """Next-token logits, or with ``targets_BT`` the cross-entropy loss.

        positions_BT: position of each token (default: cache length + 0..T-1); pass per-row positions
            for left-padded batches and for packed documents (positions restart at each document).
        cache: a KVCache from ``new_cache``; the new keys/values are appended and ``cache.length``
            advances by T.
        key_mask_BS: False at padding slots, over the cache length plus the T new tokens.
        doc_ids_BT: document index of each token of a packed row; attention stays inside a document.
        last_only: compute logits for the last position only (decoding).
        output_attentions: take the explicit attention path and also return per-layer weights [B,H,T,S].
        targets_BT: the next token at each position (-100: no loss there). Returns the cross-entropy instead
            of the logits, reduced by ``loss_reduction`` ("mean" over the targets, or "sum"). On the CPU in
            fp32 the head and the loss run in one chunked pass that never holds the [B,T,V] logits
            (head_loss.py); elsewhere it is ``F.cross_entropy`` on the logits.
        """
        if targets_BT is not None and (last_only or output_attentions or cache is not None):
            raise ValueError("targets_BT computes the loss over every position: it cannot be combined with "
                             "last_only, output_attentions or a KV cache")
        B, T = idx_BT.shape
        past = cache.length if cache is not None else 0
        if positions_BT is None:
            positions_BT = torch.arange(past, past + T, device=idx_BT.device).expand(B, T)
        if past + T > self.cfg.block_size and self.cfg.pos == "learned":
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.cfg.block_size}")

        # The chunked head loss (head_loss.py), decided once from the head's weight and the token count.
        fused = targets_BT is not None and self._fused_head(idx_BT.numel())
        tied = None
        if fused and self.cfg.tie_embeddings and self.tok_emb.weight.requires_grad:
            # The chunked head computes the tied matrix's gradient; the lookup adds its rows into it in place
            # instead of making a second [V, C] tensor of mostly zeros (head_loss.TiedGradient).
            tied = TiedGradient()
            x_BTC = tied_lookup(idx_BT, self.tok_emb.weight, tied)
        else:
            x_BTC = self.tok_emb(idx_BT)
        if self.cfg.scale_embeddings:
            x_BTC = x_BTC * math.sqrt(self.cfg.d_model)
        if self.pos_emb is not None:
            x_BTC = x_BTC + self.pos_emb(positions_BT)
        elif self.cfg.pos == "sinusoidal":
            x_BTC = x_BTC + sinusoidal_encoding(positions_BT, self.cfg.d_model).to(x_BTC.dtype)
        x_BTC = self.drop(x_BTC)

        rope = rope_cos_sin(positions_BT, self.rope_inv_freq) if self.rope_inv_freq is not None else None
        mask = attention_mask(T, past, key_mask_BS=key_mask_BS, doc_ids_BT=doc_ids_BT,
                              alibi_H=self.alibi_slopes, device=idx_BT.device)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(x_BTC.dtype)

        all_weights = []
        for block in self.blocks:
            x_BTC, weights = block(x_BTC, rope=rope, mask=mask, is_causal=T > 1, cache=cache,
                                   need_weights=output_attentions)
            all_weights.append(weights)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x_BTC = x_BTC[:, -1:]
        h_BTC = self.norm_f(x_BTC)
        if targets_BT is not None:
            if fused:
                return linear_cross_entropy(h_BTC.flatten(0, 1), self.lm_head.weight, targets_BT.flatten(),
                                            loss_reduction, tied)
            return cross_entropy(self.lm_head(h_BTC).flatten(0, 1), targets_BT.flatten(), loss_reduction)
        logits_BTV = self.lm_head(h_BTC)
        if output_attentions:
            return logits_BTV, all_weights
        return logits_BTV

    def _fused_head(self, n_tokens: int) -> bool:
        head = self.lm_head
        plain = type(head) is nn.Linear or getattr(type(head), "plain_linear", False)
        # Decided before the forward runs: the hidden states will have the weight's dtype and device (autocast,
        # which would change that, is one of the cases fused_loss_applies refuses).
        return plain and head.bias is None and fused_loss_applies(head.weight, head.weight, n_tokens)
