"""A whole decoding step of a decoder in one compiled call (``csrc/decode_step.c``), for CPU inference.

A decoding step multiplies one new token per row through every weight matrix once; lmforge's streaming
kernel (``lmforge.kernels``) makes those products run near the memory's speed, and what is left is the
small work between them: norms, RoPE, the KV-cache write, attention over the cache, activations and
residual adds, dozens of PyTorch operator calls per block, each with its dispatch cost, and each a point
where the threads go idle. ``DecodeStep`` runs the whole step, products included, in one OpenMP parallel
region instead (``python -m bench.decode`` times both ways).

It computes what ``DecoderLM.forward(tokens, cache=cache, last_only=True)`` computes for a one-token step,
on the same weights and the same ``KVCache`` (which it fills and advances the same way): the forward stays
the definition, and tests compare the two on every supported configuration. Sums run in another order,
so logits agree to about 1e-5, not bit for bit. It applies to CPU decoders laid out by
``prepare_for_inference`` (what ``LM.load`` does unless ``pack=False``): fp32 ``StreamLinear`` or int8
``QuantLinear`` layers,
LayerNorm or RMSNorm, learned, rotary or no positions, any of the MLP kinds, QK-norm and grouped-query
attention, in eval mode. ``decode_step_for(model)`` returns None for anything else (ALiBi, sinusoidal
positions, LoRA or other wrapped layers, another dtype or device, no C compiler), and callers keep the
model's forward. ``LMFORGE_FUSED_DECODE=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import math
import os
from typing import Optional

import torch
import torch.nn as nn

from .kernels import MAX_ROWS, MAX_ROWS_INT8, load_kernel

_MLP = {"gelu_tanh": 0, "gelu": 1, "relu": 2, "silu": 3, "relu2": 4, "swiglu": 5}
_P = ctypes.c_void_p


class _Lin(ctypes.Structure):
    _fields_ = [("w", _P), ("scale", _P), ("bias", _P), ("n", ctypes.c_long), ("k", ctypes.c_long)]


class _Layer(ctypes.Structure):
    _fields_ = [("norm1_w", _P), ("norm1_b", _P), ("norm2_w", _P), ("norm2_b", _P), ("q_norm_w", _P),
                ("k_norm_w", _P), ("qkv", _Lin), ("proj", _Lin), ("fc1", _Lin), ("fc2", _Lin),
                ("k_cache", _P), ("v_cache", _P)]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_long) for name in ("n_layers", "C", "H", "KV", "D", "F", "V", "cap", "rmsnorm",
                                                     "mlp")] + [
        ("eps", ctypes.c_float), ("emb_scale", ctypes.c_float), ("tok_emb", _P), ("pos_emb", _P),
        ("rope_inv_freq", _P), ("normf_w", _P), ("normf_b", _P), ("head", _Lin), ("layers", _P)] + [
        (name, _P) for name in ("x", "h", "qkv", "att", "ff", "act")]


def _f32(t: Optional[torch.Tensor]) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _norm_parts(norm: nn.Module) -> Optional[tuple]:
    """(weight, bias, is_rms, eps) of a LayerNorm or lmforge RMSNorm, or None for anything else."""
    from .models.layers import RMSNorm

    if type(norm) is RMSNorm:
        return norm.weight, None, True, norm.eps
    if type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1:
        return norm.weight, norm.bias, False, norm.eps
    return None


def _lin_parts(lin: nn.Module) -> Optional[tuple]:
    """(weight, scale or None, bias) of a linear layer laid out for inference (``StreamLinear``, int8
    ``QuantLinear``), or None: a plain ``nn.Linear`` means the model was loaded with ``pack=False``, which
    keeps PyTorch's own path."""
    from .packed import StreamLinear
    from .quantize import QuantLinear

    if type(lin) is StreamLinear:
        return lin.weight, None, lin.bias
    if type(lin) is QuantLinear:
        ok = lin.weight_int8.is_contiguous() and lin.weight_int8.device.type == "cpu"
        return (lin.weight_int8, lin.scale, lin.bias) if ok else None
    return None


class DecodeStep:
    """The compiled step for one model (build it with ``decode_step_for``). Call it as
    ``step(tokens_B, cache, positions_B=None, start_B=None)`` -> logits [B, V] of the new tokens, where
    ``positions_B`` defaults to the cache length for every row and ``start_B`` is each row's first cache
    slot that is not left padding (default 0). It advances the cache by one slot. ``rows`` is the same step
    on bare key and value buffers where each row has its own length (the server's slot cache)."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL, parts: dict):
        self.model, self.lib = model, lib
        cfg = model.cfg
        self.keep = []  # every tensor the C structs point to stays alive with this object
        self.int8 = parts["int8"]
        self.c = _Model()
        c = self.c
        c.n_layers, c.C, c.H, c.KV, c.D = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd
        c.F, c.V, c.rmsnorm, c.mlp = cfg.ff, cfg.vocab_size, int(cfg.norm == "rmsnorm"), _MLP[cfg.mlp]
        c.eps, c.emb_scale = parts["eps"], math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        c.tok_emb, c.pos_emb = self._hold(model.tok_emb.weight), self._hold(parts["pos_emb"])
        c.rope_inv_freq = self._hold(parts["inv_freq"])
        c.normf_w, c.normf_b = self._hold(parts["norm_f"][0]), self._hold(parts["norm_f"][1])
        self._set_lin(c.head, parts["head"])
        self.layers = (_Layer * cfg.n_layers)()
        for L, blk in zip(self.layers, parts["blocks"]):
            L.norm1_w, L.norm1_b = self._hold(blk["norm1"][0]), self._hold(blk["norm1"][1])
            L.norm2_w, L.norm2_b = self._hold(blk["norm2"][0]), self._hold(blk["norm2"][1])
            L.q_norm_w, L.k_norm_w = self._hold(blk["q_norm"]), self._hold(blk["k_norm"])
            for name in ("qkv", "proj", "fc1", "fc2"):
                self._set_lin(getattr(L, name), blk[name])
        c.layers = ctypes.addressof(self.layers)
        self.scratch_rows = 0
        self.max_rows = MAX_ROWS_INT8 if self.int8 else MAX_ROWS

    def _hold(self, t: Optional[torch.Tensor]) -> Optional[int]:
        if t is None:
            return None
        t = t.detach()
        self.keep.append(t)
        return t.data_ptr()

    def _set_lin(self, dst: _Lin, parts: tuple) -> None:
        w, scale, bias = parts
        dst.w, dst.scale, dst.bias = self._hold(w), self._hold(scale), self._hold(bias)
        dst.n, dst.k = w.shape

    def _scratch(self, B: int) -> None:
        if B <= self.scratch_rows:
            return
        cfg, c = self.model.cfg, self.c
        sizes = {"x": cfg.d_model, "h": cfg.d_model, "qkv": (cfg.n_heads + 2 * cfg.kv_heads) * cfg.hd,
                 "att": cfg.n_heads * cfg.hd, "ff": cfg.ff * (2 if cfg.mlp == "swiglu" else 1), "act": cfg.ff}
        self.buffers = {k: torch.empty(B, n) for k, n in sizes.items()}
        for k, t in self.buffers.items():
            setattr(c, k, t.data_ptr())
        self.scratch_rows = B

    def applies(self, B: int, cache) -> bool:
        """Whether this step can take B rows on this cache (fp32 contiguous tensors, room for one more slot)."""
        if B < 1 or B > self.max_rows or cache.length >= cache.max_len:
            return False
        k0 = cache.k[0]
        return k0.shape[0] == B and all(_f32(t) for t in (cache.k[0], cache.v[0]))

    def __call__(self, tokens_B: torch.Tensor, cache, positions_B: Optional[torch.Tensor] = None,
                 start_B: Optional[torch.Tensor] = None) -> torch.Tensor:
        B = tokens_B.shape[0]
        if not self.applies(B, cache):
            raise ValueError(f"the compiled step does not take {B} rows on this cache")
        slot = cache.length
        logits = self.rows(tokens_B, cache.k, cache.v, torch.full((B,), slot, dtype=torch.int64),
                           positions_B=positions_B, start_B=start_B)
        cache.advance(1)
        return logits

    def rows(self, tokens_B: torch.Tensor, k: list, v: list, end_B: torch.Tensor,
             positions_B: Optional[torch.Tensor] = None, start_B: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The step on the first B rows of per-layer key and value buffers [rows, kv_heads, capacity, head_dim]
        (fp32, contiguous): row b writes its new key and value at slot ``end_B[b]`` and attends to slots
        ``start_B[b]`` (default 0) through ``end_B[b]``, at position ``positions_B[b]`` (default
        ``end_B[b]``). Each row's arithmetic depends only on that row and on B. Returns logits [B, V]."""
        cfg, c = self.model.cfg, self.c
        B = tokens_B.shape[0]
        if not 1 <= B <= self.max_rows:
            raise ValueError(f"the compiled step takes 1 to {self.max_rows} rows, not {B}")
        if len(k) != cfg.n_layers or len(v) != cfg.n_layers:
            raise ValueError(f"need key and value buffers for {cfg.n_layers} layers")
        shape = (cfg.kv_heads, k[0].shape[2] if k[0].dim() == 4 else 0, cfg.hd)
        for t in list(k) + list(v):
            if not _f32(t) or t.dim() != 4 or t.shape[0] < B or tuple(t.shape[1:]) != shape:
                raise ValueError("the KV cache must hold contiguous fp32 CPU tensors [rows, kv_heads, capacity, "
                                 f"head_dim] with at least {B} rows and the same shape in every layer")
        cap = shape[1]

        def ids(t: Optional[torch.Tensor], name: str) -> Optional[torch.Tensor]:
            if t is None:
                return None
            t = t.reshape(-1).to(torch.int64).contiguous()
            if t.numel() != B:
                raise ValueError(f"{name} needs one entry per row ({B}), not {t.numel()}")
            return t

        tok, end = ids(tokens_B, "tokens"), ids(end_B, "end_B")
        pos = end if positions_B is None else ids(positions_B, "positions_B")
        start = ids(start_B, "start_B")
        if int(tok.min()) < 0 or int(tok.max()) >= self.model.tok_emb.weight.shape[0]:
            raise ValueError("token id outside the embedding table")
        if int(end.min()) < 0 or int(end.max()) >= cap:
            raise ValueError(f"cache slot outside the cache's {cap}")
        if start is not None and (int(start.min()) < 0 or bool((start > end).any())):
            raise ValueError("a row's first visible slot must lie in [0, its write slot]")
        if int(pos.min()) < 0:
            raise ValueError(f"negative position {int(pos.min())}")
        if cfg.pos == "learned" and int(pos.max()) >= cfg.block_size:
            raise ValueError(f"position {int(pos.max())} exceeds block_size {cfg.block_size}")
        self._scratch(B)
        c.cap = cap
        for L, kl, vl in zip(self.layers, k, v):
            L.k_cache, L.v_cache = kl.data_ptr(), vl.data_ptr()
        logits = torch.empty(B, cfg.vocab_size)
        self.lib.lmf_decode_step(ctypes.addressof(c), B, tok.data_ptr(), pos.data_ptr(), _ptr(start),
                                 end.data_ptr(), logits.data_ptr())
        return logits


def _parts(model: nn.Module) -> Optional[dict]:
    """What the C step needs from a DecoderLM, or None where some part is not one it knows."""
    from .models.decoder import DecoderLM

    if type(model) is not DecoderLM or model.training:
        return None
    cfg = model.cfg
    if cfg.pos not in ("learned", "rope", "none") or cfg.mlp not in _MLP or cfg.hd > 256 or cfg.hd % 2:
        return None
    if cfg.n_heads % cfg.kv_heads or type(model.tok_emb) is not nn.Embedding:
        return None
    parts: dict = {"pos_emb": model.pos_emb.weight if model.pos_emb is not None else None,
                   "inv_freq": model.rope_inv_freq if cfg.pos == "rope" else None,
                   "norm_f": _norm_parts(model.norm_f), "head": _lin_parts(model.lm_head), "blocks": []}
    if parts["inv_freq"] is not None:
        parts["inv_freq"] = parts["inv_freq"].float().contiguous()
    norms = [parts["norm_f"]]
    lins = [parts["head"]]
    for blk in model.blocks:
        a, mlp = blk.attn, blk.mlp
        q = _norm_parts(a.q_norm) if a.q_norm is not None else (None,)
        k = _norm_parts(a.k_norm) if a.k_norm is not None else (None,)
        if q is None or k is None:
            return None
        b = {"norm1": _norm_parts(blk.norm1), "norm2": _norm_parts(blk.norm2), "q_norm": q[0], "k_norm": k[0],
             "qkv": _lin_parts(a.qkv), "proj": _lin_parts(a.proj), "fc1": _lin_parts(mlp.fc1),
             "fc2": _lin_parts(mlp.fc2)}
        if mlp.kind == "gelu_tanh" and not isinstance(mlp.act, nn.GELU):
            return None
        norms += [b["norm1"], b["norm2"]]
        lins += [b[n] for n in ("qkv", "proj", "fc1", "fc2")]
        parts["blocks"].append(b)
    if any(n is None for n in norms) or any(x is None for x in lins):
        return None
    if len({n[2] for n in norms}) != 1 or len({n[3] for n in norms}) != 1:
        return None  # one norm kind and one epsilon throughout, as the config makes them
    parts["eps"] = norms[0][3]
    kinds = {x[1] is None for x in lins}
    if len(kinds) != 1:
        return None  # all fp32 or all int8
    parts["int8"] = not kinds.pop()
    floats = [model.tok_emb.weight, parts["pos_emb"], parts["inv_freq"]]
    floats += [t for n in norms for t in n[:2]] + [x[1] for x in lins] + [x[2] for x in lins]
    floats += [t for b in parts["blocks"] for t in (b["q_norm"], b["k_norm"])]
    if not parts["int8"]:
        floats += [x[0] for x in lins]
    if not all(_f32(t) for t in floats):
        return None
    return parts


def decode_step_for(model: nn.Module) -> Optional[DecodeStep]:
    """A ``DecodeStep`` for ``model``, or None where it does not apply (see the module docstring)."""
    if os.environ.get("LMFORGE_FUSED_DECODE", "1") == "0":
        return None
    parts = _parts(model)
    if parts is None:
        return None
    lib = load_kernel()
    if lib is None:
        return None
    return DecodeStep(model, lib, parts)
