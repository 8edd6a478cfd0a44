"""Encoder-only Transformer (BERT, Devlin et al. 2019).

Every position attends to every other (no causal mask; padding keys are hidden), so each output vector
sees the whole sentence. BERT's recipe, all chosen by ``ModelConfig`` (arch "encoder"):

    learned absolute positions + token-type (segment) embeddings, summed with the token embeddings
    and normalized (``embed_norm``); post-norm blocks, norm(x + f(x)) (``norm_position="post"``); exact
    GELU; LayerNorm eps 1e-12; biases everywhere.

Heads on top of the final hidden states ``h_BTC``:
    masked-LM   ``mlm_head``: dense, activation, norm, then logits over the vocabulary through the
                (tied) output projection with a per-token bias (``head_bias``)
    pooler      ``pooler``: tanh(W h[:, 0] + b), the [CLS] vector
    classifier  ``n_labels > 0``: a linear layer on the pooled vector (BertForSequenceClassification)
    mean        sentence embeddings: the mean of h over the real (non-padding) tokens, as
                sentence-transformers models such as all-MiniLM-L6-v2 are trained to be used

Shape legend: see layers.py.

Parameter names (the checkpoint contract, used by interop/hf_bert.py):
    tok_emb.weight [V, C]   pos_emb.weight [block_size, C] (learned)   type_emb.weight [types, C]
    emb_norm                (embed_norm)
    blocks.N.norm1, blocks.N.attn.qkv [3C, C] rows [q; k; v], blocks.N.attn.proj, blocks.N.norm2,
    blocks.N.mlp.fc1, blocks.N.mlp.fc2     (the same names as the decoder's blocks)
    norm_f                  (pre-norm only)
    pooler.weight [C, C] + .bias        classifier.weight [n_labels, C] + .bias
    mlm_dense.weight [C, C] (+ .bias)   mlm_norm   lm_head.weight [V, C] (absent when tied)  lm_head.bias [V]
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .layers import MLP, Attention, make_norm, sinusoidal_encoding

HEADS = ("hidden", "mlm", "pooled", "classify", "mean")


def activation(kind: str, x: torch.Tensor) -> torch.Tensor:
    """The MLP's nonlinearity applied on its own (for the MLM head's transform); SwiGLU's gate is SiLU."""
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "relu":
        return F.relu(x)
    if kind == "relu2":
        return F.relu(x).square()
    return F.silu(x)  # silu, swiglu


def padding_mask(key_mask_BS: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A key-padding mask [B, S] (True = real token) as the [B, 1, 1, S] boolean mask attention takes;
    None when there is no padding (SDPA's fast path)."""
    if key_mask_BS is None:
        return None
    key_mask_BS = key_mask_BS.bool()
    if bool(key_mask_BS.all()):
        return None
    return key_mask_BS[:, None, None, :]


class EncoderBlock(nn.Module):
    """Bidirectional self-attention then an MLP, each a residual branch. Post-norm (the original
    Transformer, BERT, Marian): x = norm(x + f(x)). Pre-norm: x = x + f(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.post = cfg.norm_position == "post"
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x_BTC: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.post:
            x_BTC = self.norm1(x_BTC + self.attn(x_BTC, mask=mask, is_causal=False)[0])
            return self.norm2(x_BTC + self.mlp(x_BTC))
        x_BTC = x_BTC + self.attn(self.norm1(x_BTC), mask=mask, is_causal=False)[0]
        return x_BTC + self.mlp(self.norm2(x_BTC))


class EncoderModel(nn.Module):
    """Token ids [B, T] -> hidden states [B, T, C], or one of the heads' outputs (``forward(head=...)``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.arch != "encoder":
            raise ValueError(f"EncoderModel needs arch 'encoder', got {cfg.arch!r}")
        self.cfg = cfg
        C = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.pos_emb = nn.Embedding(cfg.block_size, C) if cfg.pos == "learned" else None
        self.type_emb = nn.Embedding(cfg.type_vocab_size, C) if cfg.type_vocab_size else None
        self.emb_norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = make_norm(cfg) if cfg.norm_position == "pre" else None
        self.pooler = nn.Linear(C, C) if cfg.pooler else None
        self.classifier = nn.Linear(C, cfg.n_labels) if cfg.n_labels else None
        self.lm_head = None
        if cfg.mlm_head:
            self.mlm_dense = nn.Linear(C, C, bias=cfg.bias)
            self.mlm_norm = make_norm(cfg)
            self.lm_head = nn.Linear(C, cfg.vocab_size, bias=cfg.head_bias)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reinit_buffers(self) -> None:
        """Nothing is derived: positions are learned or computed on the fly (kept for the loader's API)."""

    def reset_parameters(self) -> None:
        """BERT's initialization: N(0, init_std) weights and embeddings, zero biases, unit norm gains."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, self.cfg.init_std)

    def num_params(self, include_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied head is counted once
        if not include_embeddings:
            for emb in (self.tok_emb, self.pos_emb, self.type_emb):
                n -= emb.weight.numel() if emb is not None else 0
            if self.lm_head is not None and not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    # ----------------------------------------------------------------------------------------------
    def embed(self, idx_BT: torch.Tensor, token_types_BT: Optional[torch.Tensor] = None,
              positions_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T = idx_BT.shape
        cfg = self.cfg
        if T > cfg.block_size and cfg.pos == "learned":
            raise ValueError(f"sequence of {T} tokens exceeds block_size {cfg.block_size}")
        if positions_BT is None:
            positions_BT = torch.arange(T, device=idx_BT.device).expand(B, T)
        x_BTC = self.tok_emb(idx_BT)
        if cfg.scale_embeddings:
            x_BTC = x_BTC * math.sqrt(cfg.d_model)
        if self.pos_emb is not None:
            x_BTC = x_BTC + self.pos_emb(positions_BT)
        elif cfg.pos == "sinusoidal":
            x_BTC = x_BTC + sinusoidal_encoding(positions_BT, cfg.d_model, cfg.sinusoidal_layout).to(x_BTC.dtype)
        if self.type_emb is not None:
            # BERT's default: every token is segment A (type 0) unless told otherwise.
            types_BT = token_types_BT if token_types_BT is not None else torch.zeros_like(idx_BT)
            x_BTC = x_BTC + self.type_emb(types_BT)
        if self.emb_norm is not None:
            x_BTC = self.emb_norm(x_BTC)
        return self.drop(x_BTC)

    def forward(self, idx_BT: torch.Tensor, *, key_mask_BT: Optional[torch.Tensor] = None,
                token_types_BT: Optional[torch.Tensor] = None, positions_BT: Optional[torch.Tensor] = None,
                head: str = "hidden") -> torch.Tensor:
        """Run the encoder and one head.

        key_mask_BT: True at real tokens, False at padding (None: no padding); padding keys are hidden.
        token_types_BT: segment ids (default 0). positions_BT: default 0..T-1.
        head: "hidden" [B, T, C] final hidden states; "mlm" [B, T, V] masked-LM logits; "pooled" [B, C];
            "classify" [B, n_labels] logits; "mean" [B, C] mean of the hidden states over real tokens.
        """
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        mask = padding_mask(key_mask_BT)
        x_BTC = self.embed(idx_BT, token_types_BT, positions_BT)
        for block in self.blocks:
            x_BTC = block(x_BTC, mask)
        if self.norm_f is not None:
            x_BTC = self.norm_f(x_BTC)
        if head == "hidden":
            return x_BTC
        if head == "mlm":
            if self.lm_head is None:
                raise ValueError("this encoder has no masked-LM head (model.mlm_head is false)")
            h_BTC = self.mlm_norm(activation(self.cfg.mlp, self.mlm_dense(x_BTC)))
            return self.lm_head(h_BTC)
        if head == "mean":
            return mean_pool(x_BTC, key_mask_BT)
        if self.pooler is None:
            raise ValueError("this encoder has no pooler (model.pooler is false)")
        pooled_BC = torch.tanh(self.pooler(x_BTC[:, 0]))
        if head == "pooled":
            return pooled_BC
        if self.classifier is None:
            raise ValueError("this encoder has no classification head (model.n_labels is 0)")
        return self.classifier(self.drop(pooled_BC))


def mean_pool(h_BTC: torch.Tensor, key_mask_BT: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of the hidden states over real tokens (padding excluded): sentence-transformers' pooling."""
    if key_mask_BT is None:
        return h_BTC.mean(dim=1)
    m_BT1 = key_mask_BT.to(h_BTC.dtype)[..., None]
    return (h_BTC * m_BT1).sum(dim=1) / m_BT1.sum(dim=1).clamp(min=1e-9)
