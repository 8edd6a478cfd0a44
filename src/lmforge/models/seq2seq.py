"""Encoder-decoder Transformer (Vaswani et al. 2017, "Attention Is All You Need"; Marian, Junczys-Dowmunt
et al. 2018).

The encoder reads the whole source sentence with bidirectional self-attention (encoder.py's blocks).
The decoder is a causal language model over the target that, in every block, also attends to the
encoder's output (the "memory") through cross-attention:

    decoder block:  x = x + SelfAttn(x)  (causal)        each sub-layer post-norm, norm(x + f(x)),
                    x = x + CrossAttn(x, memory)         as in the paper, or pre-norm, x + f(norm(x)),
                    x = x + MLP(x)                       with a final norm after each stack

Positions are sinusoidal (section 3.5; ``sinusoidal_layout`` picks the paper's interleaved sin/cos or the
concatenated layout of tensor2tensor and Marian) or learned. Embeddings are multiplied by sqrt(d_model)
(``scale_embeddings``, section 3.4). One vocabulary may be shared by source and target, and then one
matrix serves as source embedding, target embedding and output projection (three-way tying, section
3.4); with ``src_vocab_size`` the source has its own embedding.

Training is teacher forcing: the decoder input is the target shifted right behind ``decoder_start_id``,
and the loss is the cross-entropy of each next target token (finetune/seq2seq.py). Generation
(seq2seq_generate.py) encodes the source once, precomputes every layer's cross-attention keys and values
(``Seq2SeqState``), and decodes one token at a time through the self-attention KV cache.

Shape legend (see layers.py): B batch, T target positions, S source positions, C width, H query heads,
K key/value heads, D head width, V target vocabulary.

Parameter names (the checkpoint contract, used by interop/hf_marian.py):
    tok_emb.weight [V, C]          target embedding (and the source's when the vocabulary is shared)
    src_emb.weight [Vs, C]         source embedding (src_vocab_size only)
    enc_pos_emb / dec_pos_emb      .weight [block_size, C] (learned positions only)
    enc_emb_norm / dec_emb_norm    (embed_norm only)
    encoder.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}          encoder blocks
    enc_norm_f / dec_norm_f        (pre-norm only)
    decoder.N.norm1, decoder.N.attn.qkv [(H + 2K) * D, C], decoder.N.attn.proj   causal self-attention
    decoder.N.norm2, decoder.N.cross_attn.q [H * D, C], .kv [2 * K * D, C] rows [k; v], .proj
    decoder.N.norm3, decoder.N.mlp.fc1, decoder.N.mlp.fc2
    lm_head.weight [V, C] (absent when tied)   lm_head.bias [V] (head_bias: Marian's final_logits_bias)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .encoder import EncoderBlock, padding_mask
from .layers import MLP, Attention, KVCache, make_norm, sinusoidal_encoding


class CrossAttention(nn.Module):
    """Multi-head attention from decoder queries to encoder keys/values (Vaswani et al. 2017, 3.2.3).
    The keys and values depend on the source only, so generation computes them once per sentence
    (``memory_kv``) and every decoding step reuses them. Key and value projections are stacked as one
    matrix [W_k; W_v]; with fewer key/value heads than query heads it is grouped-query attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.hd
        C, H, K, D = cfg.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        self.q = nn.Linear(C, H * D, bias=cfg.use_qkv_bias)
        self.kv = nn.Linear(C, 2 * K * D, bias=cfg.use_qkv_bias)
        self.proj = nn.Linear(H * D, C, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def memory_kv(self, memory_BSC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, K, S, D] of the encoder output."""
        B, S, _ = memory_BSC.shape
        K, D = self.n_kv_heads, self.head_dim
        k_BSKD, v_BSKD = self.kv(memory_BSC).view(B, S, 2 * K, D).split([K, K], dim=2)
        return k_BSKD.transpose(1, 2), v_BSKD.transpose(1, 2)

    def forward(self, x_BTC: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q_BHTD = self.q(x_BTC).view(B, T, H, D).transpose(1, 2)
        k_BKSD, v_BKSD = kv
        if K != H:
            k_BKSD, v_BKSD = k_BKSD.repeat_interleave(H // K, dim=1), v_BKSD.repeat_interleave(H // K, dim=1)
        y_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BKSD, v_BKSD, attn_mask=mask,
                                                dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y_BHTD.transpose(1, 2).reshape(B, T, H * D)))


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the memory, MLP; post- or pre-norm."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.post = cfg.norm_position == "post"
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.norm3 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x_BTC, kv, src_mask, cache: Optional[KVCache]) -> torch.Tensor:
        causal = x_BTC.shape[1] > 1  # one new token attends to the whole cache: no mask needed
        if self.post:
            x_BTC = self.norm1(x_BTC + self.attn(x_BTC, is_causal=causal, cache=cache)[0])
            x_BTC = self.norm2(x_BTC + self.cross_attn(x_BTC, kv, src_mask))
            return self.norm3(x_BTC + self.mlp(x_BTC))
        x_BTC = x_BTC + self.attn(self.norm1(x_BTC), is_causal=causal, cache=cache)[0]
        x_BTC = x_BTC + self.cross_attn(self.norm2(x_BTC), kv, src_mask)
        return x_BTC + self.mlp(self.norm3(x_BTC))


@dataclass
class Seq2SeqState:
    """What decoding needs from the source: per-layer cross-attention keys/values, the source padding
    mask, and the decoder's self-attention KV cache. ``select`` keeps/reorders rows (beam search)."""

    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]
    src_mask: Optional[torch.Tensor]  # [B, 1, 1, S] bool, or None without padding
    cache: KVCache

    def select(self, rows: torch.Tensor) -> None:
        self.cross_kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cross_kv]
        if self.src_mask is not None:
            self.src_mask = self.src_mask.index_select(0, rows)
        self.cache.select(rows)


class Seq2SeqModel(nn.Module):
    """Source ids [B, S] and decoder input ids [B, T] -> next-target-token logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.arch != "seq2seq":
            raise ValueError(f"Seq2SeqModel needs arch 'seq2seq', got {cfg.arch!r}")
        self.cfg = cfg
        C = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.src_emb = nn.Embedding(cfg.src_vocab_size, C) if cfg.src_vocab_size else None
        learned = cfg.pos == "learned"
        self.enc_pos_emb = nn.Embedding(cfg.block_size, C) if learned else None
        self.dec_pos_emb = nn.Embedding(cfg.block_size, C) if learned else None
        self.enc_emb_norm = make_norm(cfg) if cfg.embed_norm else None
        self.dec_emb_norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderBlock(cfg, i) for i in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.dec_layers))
        pre = cfg.norm_position == "pre"
        self.enc_norm_f = make_norm(cfg) if pre else None
        self.dec_norm_f = make_norm(cfg) if pre else None
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reinit_buffers(self) -> None:
        """Nothing is derived: sinusoidal positions are computed on the fly (kept for the loader's API)."""

    def reset_parameters(self) -> None:
        """Xavier-uniform linear weights (Glorot & Bengio 2010), as the reference implementations of the
        paper (tensor2tensor, fairseq) use; zero biases; unit norm gains. A fixed small std such as GPT-2's
        0.02 leaves a narrow model's cross-attention (a product of four such matrices) with almost no
        gradient, and it then learns to ignore the source. Embeddings are N(0, 1/sqrt(C)) with scaled
        embeddings, so sqrt(C) * embedding has unit scale like the sinusoids it is added to, and as a tied
        output projection it gives logits of unit scale (fairseq's choice); else N(0, init_std)."""
        emb_std = self.cfg.d_model ** -0.5 if self.cfg.scale_embeddings else self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name in ("tok_emb.weight", "src_emb.weight", "enc_pos_emb.weight", "dec_pos_emb.weight"):
                nn.init.normal_(p, 0.0, emb_std)
            elif name == "lm_head.weight":  # untied output projection
                nn.init.normal_(p, 0.0, self.cfg.d_model ** -0.5)
            else:
                nn.init.xavier_uniform_(p)

    def num_params(self, include_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied head is counted once
        if not include_embeddings:
            for emb in (self.tok_emb, self.src_emb, self.enc_pos_emb, self.dec_pos_emb):
                n -= emb.weight.numel() if emb is not None else 0
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    # ----------------------------------------------------------------------------------------------
    def _embed(self, idx_BT, table: nn.Embedding, pos_table: Optional[nn.Embedding], norm, past: int = 0):
        cfg = self.cfg
        B, T = idx_BT.shape
        if past + T > cfg.block_size and cfg.pos == "learned":
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {cfg.block_size}")
        x_BTC = table(idx_BT)
        if cfg.scale_embeddings:
            x_BTC = x_BTC * math.sqrt(cfg.d_model)
        positions_T = torch.arange(past, past + T, device=idx_BT.device)
        if pos_table is not None:
            x_BTC = x_BTC + pos_table(positions_T)
        elif cfg.pos == "sinusoidal":
            x_BTC = x_BTC + sinusoidal_encoding(positions_T, cfg.d_model, cfg.sinusoidal_layout).to(x_BTC.dtype)
        if norm is not None:
            x_BTC = norm(x_BTC)
        return self.drop(x_BTC)

    def encode(self, src_BS: torch.Tensor, src_mask_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The memory [B, S, C]. src_mask_BS: True at real source tokens (None: no padding)."""
        mask = padding_mask(src_mask_BS)
        x_BSC = self._embed(src_BS, self.src_emb if self.src_emb is not None else self.tok_emb, self.enc_pos_emb,
                            self.enc_emb_norm)
        for block in self.encoder:
            x_BSC = block(x_BSC, mask)
        return self.enc_norm_f(x_BSC) if self.enc_norm_f is not None else x_BSC

    def decode(self, tgt_BT: torch.Tensor, cross_kv: list, src_mask: Optional[torch.Tensor],
               cache: Optional[KVCache] = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] of the next target token after each decoder input position.
        cross_kv: per-layer (k, v) from ``memory_kv``; src_mask: [B, 1, 1, S] bool or None."""
        past = cache.length if cache is not None else 0
        x_BTC = self._embed(tgt_BT, self.tok_emb, self.dec_pos_emb, self.dec_emb_norm, past)
        for block, kv in zip(self.decoder, cross_kv):
            x_BTC = block(x_BTC, kv, src_mask, cache)
        if cache is not None:
            cache.advance(tgt_BT.shape[1])
        if last_only:
            x_BTC = x_BTC[:, -1:]
        if self.dec_norm_f is not None:
            x_BTC = self.dec_norm_f(x_BTC)
        return self.lm_head(x_BTC)

    def memory_kv(self, memory_BSC: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [block.cross_attn.memory_kv(memory_BSC) for block in self.decoder]

    def forward(self, src_BS: torch.Tensor, tgt_BT: torch.Tensor, *,
                src_mask_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced logits [B, T, V]: ``tgt_BT`` is the decoder input (targets shifted right).
        Padding at the end of a target row needs no mask: causal attention never looks ahead and the
        loss ignores those positions."""
        memory_BSC = self.encode(src_BS, src_mask_BS)
        return self.decode(tgt_BT, self.memory_kv(memory_BSC), padding_mask(src_mask_BS))

    # ----------------------------------------------------------------------------------------------
    def start_decoding(self, src_BS: torch.Tensor, src_mask_BS: Optional[torch.Tensor], max_len: int,
                       dtype: Optional[torch.dtype] = None) -> Seq2SeqState:
        """Encode the source and prepare the decoding state for up to ``max_len`` decoder positions."""
        memory_BSC = self.encode(src_BS, src_mask_BS)
        p = self.tok_emb.weight
        cache = KVCache(self.cfg.dec_layers, src_BS.shape[0], self.cfg.kv_heads, max_len, self.cfg.hd, p.device,
                        dtype or memory_BSC.dtype)
        return Seq2SeqState(self.memory_kv(memory_BSC), padding_mask(src_mask_BS), cache)
