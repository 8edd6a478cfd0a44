"""Output head and cross-entropy in one pass over the vocabulary, for fp32 training on the CPU.

The plain path computes the logits ``h @ W^T`` [N, V], then ``log_softmax`` and the loss, and on the way back
the logits' gradient [N, V] and two products with it. For GPT-2's 50,257-token vocabulary at 512 tokens the
logits alone are 103 MB, written and read several times (and mapped afresh, page by page, whenever the
allocator does not reuse the block), and the head's forward product, one matmul with a 50,257-wide output,
runs well below the machine's matmul rate (64-71% of it in profiles of GPT-2 124M's step;
``python -m bench.train_step --config 124m --compare-loss`` times both paths).

``linear_cross_entropy`` walks the vocabulary in chunks of rows of ``W`` instead:

forward, chunk c (rows a..b of W):
    E_c = W[a:b] @ h^T                      [b - a, N]   vocabulary-major, a few MB, stays in cache
    z[n] = E_c[y[n] - a, n]                 the target logits that fall in this chunk
    m' = max(m, max_v E_c);  s = s * exp(m - m') + sum_v exp(E_c - m');  E_c <- exp(E_c - m')  (in place)
    loss = sum_n (m + log s - z) over the targets, divided by their count for the mean
backward, chunk c:
    P_c = E_c * exp(m_c - m) / s            the softmax, rescaled from the running maximum m_c it was taken at
    P_c[y[n] - a, n] -= 1;  P_c *= dloss / count (0 at ignored targets)
    dh += P_c^T @ W[a:b];   dW[a:b] = P_c @ h

Every product is a chunk-sized one the BLAS runs near its peak, no [N, V] tensor is allocated at once, the
exponential is taken once per logit (the backward multiplies), and the loss and gradients are those of
``F.cross_entropy(h @ W.T, y, ignore_index=-100)`` up to fp32 rounding. With gradients off (evaluation) the
chunks are dropped as soon as they are summed.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels import _onednn, onednn_linear_available, softmax_chunk_

IGNORE_INDEX = -100
# A chunk holds about this many logits (4 MiB in fp32): small enough to stay in the last-level cache
# between its product and its softmax, wide enough that the product runs at full rate.
_CHUNK_ELEMENTS = 1 << 20
_MIN_CHUNK = 256
# LMFORGE_FUSED_LOSS=0 turns the chunked path off (the plain logits path everywhere; benchmarks flip
# ``enabled``), =always takes it at any size.
_SETTING = os.environ.get("LMFORGE_FUSED_LOSS", "1")
enabled = _SETTING != "0"
# Below this many logits the plain path was as fast or faster in standalone timings: the chunked pass has a
# fixed cost per call (its Python loop and per-chunk index work) that a small head does not repay.
_MIN_LOGITS = 0 if _SETTING == "always" else 1 << 19


def cross_entropy(logits_NV: torch.Tensor, y_N: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The plain path: ``F.cross_entropy`` on the logits, taken in fp32, targets -100 ignored."""
    return F.cross_entropy(logits_NV.float(), y_N, ignore_index=IGNORE_INDEX, reduction=reduction)


def chunk_rows(n_tokens: int, vocab: int) -> int:
    """Vocabulary rows per chunk for ``n_tokens`` tokens: about 1 Mi logits, a multiple of 16, at least 256."""
    rows = max(_MIN_CHUNK, (_CHUNK_ELEMENTS // max(n_tokens, 1)) // 16 * 16)
    return min(rows, vocab)


def fused_loss_applies(h: torch.Tensor, weight: torch.Tensor, n_tokens: Optional[int] = None) -> bool:
    """Whether ``linear_cross_entropy`` runs its chunked pass for these operands (hidden states [..., C] of
    ``n_tokens`` tokens, by default all of h's, and weight [V, C]): fp32 CPU tensors, at least ``_MIN_LOGITS``
    logits, outside autocast and torch.compile. Elsewhere (small vocabularies, GPU, bf16, autocast, compiled
    graphs) the plain logits path is used; there it is as fast, or the vendor kernels and the compiler
    already handle the head."""
    if n_tokens is None:
        n_tokens = h.numel() // max(h.shape[-1], 1)
    return (enabled and n_tokens * weight.shape[0] >= _MIN_LOGITS
            and h.device.type == "cpu" and weight.device.type == "cpu" and h.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def _check_targets(y: torch.Tensor, vocab: int) -> None:
    bad = (y != IGNORE_INDEX) & ((y < 0) | (y >= vocab))
    if bool(bad.any()):
        raise IndexError(f"target {int(y[bad][0])} is out of bounds for a vocabulary of {vocab} "
                         f"(targets are 0..{vocab - 1}, or {IGNORE_INDEX} to ignore a position)")


class TiedGradient:
    """Where the head's weight gradient waits for the token lookup's rows, when the two share one matrix
    (tied embeddings). Autograd would add the lookup's gradient to the head's as a second [V, C] tensor
    (dense: zeros plus the rows; sparse: a copy of the head's plus the rows). Instead the head's backward,
    which runs first, leaves its gradient here, and the lookup's backward adds its rows into it in place.
    Autograd hands the matrix its gradient only once every use of it has been through the backward, so it
    receives the sum."""

    def __init__(self):
        self.grad: Optional[torch.Tensor] = None


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, weight, slot: TiedGradient):
        ctx.save_for_backward(idx)
        ctx.slot, ctx.shape = slot, weight.shape
        return F.embedding(idx, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        head, ctx.slot.grad = ctx.slot.grad, None  # dropped here, so autograd holds the only reference
        rows, flat = grad.reshape(-1, grad.shape[-1]), idx.reshape(-1)
        if head is not None:
            head.index_add_(0, flat, rows)
            return None, None, None
        dW = torch.zeros(ctx.shape, dtype=grad.dtype)  # the head took the plain path: a gradient of its own
        return None, dW.index_add_(0, flat, rows), None


def tied_lookup(idx: torch.Tensor, weight: torch.Tensor, slot: TiedGradient) -> torch.Tensor:
    """``F.embedding(idx, weight)`` whose weight gradient is added into the one ``linear_cross_entropy(...,
    tied=slot)`` computes for the same matrix (see ``TiedGradient``)."""
    return _TiedLookup.apply(idx, weight, slot)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NC, W_VC, y_N, reduction: str, tied: Optional[TiedGradient]):
        N, V = h_NC.shape[0], W_VC.shape[0]
        keep = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid_N = y_N != IGNORE_INDEX
        count = valid_N.sum()
        rows = chunk_rows(N, V)
        m_N = torch.full((N,), float("-inf"), dtype=h_NC.dtype)
        s_N = torch.zeros(N, dtype=h_NC.dtype)
        z_N = torch.zeros(N, dtype=h_NC.dtype)
        hT = h_NC.t()
        chunk_of_N = torch.where(valid_N, y_N, -1) // rows  # ignored targets fall in no chunk (-1)
        dnn = onednn_linear_available()
        chunks, maxima, targets = [], [], []
        for i, a in enumerate(range(0, V, rows)):
            b = min(a + rows, V)
            E = _onednn(W_VC[a:b], h_NC) if dnn else torch.mm(W_VC[a:b], hT)  # [b - a, N]
            at = (chunk_of_N == i).nonzero().squeeze(1)  # the tokens whose target is in this chunk
            target = (y_N[at] - a, at)
            if at.numel():
                z_N[at] = E[target]
            if not softmax_chunk_(E, m_N, s_N):  # the C kernel does these steps in two passes over E
                m_new = torch.maximum(m_N, E.amax(0))
                s_N.mul_(torch.exp(m_N - m_new))
                torch.exp(E.sub_(m_new), out=E)
                s_N.add_(E.sum(0))
                m_N.copy_(m_new)
            if keep:
                chunks.append(E)
                maxima.append(m_N.clone())
                targets.append(target)
        total = torch.where(valid_N, m_N + s_N.log() - z_N, 0.0).sum()
        loss = total / count if reduction == "mean" else total
        if keep:
            ctx.chunks, ctx.maxima, ctx.targets = chunks, maxima, targets
            ctx.rows, ctx.reduction, ctx.tied, ctx.dnn = rows, reduction, tied, dnn
            ctx.save_for_backward(h_NC, W_VC, valid_N, m_N, s_N, count)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h_NC, W_VC, valid_N, m_N, s_N, count = ctx.saved_tensors
        chunks, maxima, targets, rows = ctx.chunks, ctx.maxima, ctx.targets, ctx.rows
        ctx.chunks = ctx.maxima = ctx.targets = None
        step = grad / count if ctx.reduction == "mean" else grad
        w_N = torch.where(valid_N, step / s_N, 0.0)  # dloss/dlogit = w * exp(logit - m), minus step at the target
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros_like(h_NC) if need_h else None
        dW = torch.empty(W_VC.shape, dtype=W_VC.dtype) if need_W else None
        for i, a in enumerate(range(0, W_VC.shape[0], rows)):
            b = min(a + rows, W_VC.shape[0])
            P = chunks[i]
            chunks[i] = None
            P.mul_(torch.exp(maxima[i] - m_N) * w_N)
            if targets[i][1].numel():
                P[targets[i]] -= step
            if need_h:
                dh.addmm_(P.t(), W_VC[a:b])
            if need_W and ctx.dnn:
                dW[a:b] = _onednn(P, h_NC.t())
            elif need_W:
                torch.mm(P, h_NC, out=dW[a:b])
        if need_W and ctx.tied is not None:
            ctx.tied.grad = dW
        return dh, dW, None, None, None


def linear_cross_entropy(h_NC: torch.Tensor, weight_VC: torch.Tensor, y_N: torch.Tensor,
                         reduction: str = "mean", tied: Optional[TiedGradient] = None) -> torch.Tensor:
    """``F.cross_entropy(h_NC @ weight_VC.T, y_N, ignore_index=-100, reduction=reduction)`` without the [N, V]
    logits (see the module docstring). reduction: "mean" (over the targets that are not -100; nan when there
    are none, as ``F.cross_entropy``) or "sum". Falls back to that expression where ``fused_loss_applies``
    is false. tied: the ``TiedGradient`` of a ``tied_lookup`` of the same weight, for tied embeddings."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if h_NC.dim() != 2 or weight_VC.dim() != 2 or h_NC.shape[1] != weight_VC.shape[1]:
        raise ValueError(f"shapes do not match: h {tuple(h_NC.shape)}, weight {tuple(weight_VC.shape)}")
    if y_N.shape != h_NC.shape[:1]:
        raise ValueError(f"targets have shape {tuple(y_N.shape)}, expected ({h_NC.shape[0]},)")
    if not fused_loss_applies(h_NC, weight_VC):
        return cross_entropy(F.linear(h_NC, weight_VC), y_N, reduction)
    _check_targets(y_N, weight_VC.shape[0])
    return _LinearCrossEntropy.apply(h_NC.contiguous(), weight_VC, y_N.long(), reduction, tied)
