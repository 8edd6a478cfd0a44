"""Weight-only int8 quantization for CPU inference.

``quantize_model(model, "int8")`` swaps every ``nn.Linear`` of a model, from the outside (house rule 3:
the model's forward stays plain), for a ``QuantLinear`` that stores the weight as int8 with one fp32
scale per output channel (row) and computes ``y = x W^T * scale + b``:

    scale[n] = max_k |W[n, k]| / 127,   W_int8[n, k] = round(W[n, k] / scale[n])   (symmetric, per channel)

Only the weights are quantized; activations are not (unlike "dynamic" W8A8 quantization). Decoding one
token at a time reads every weight once per token and does little arithmetic with it, so its speed is
bound by memory bandwidth: int8 weights are a quarter of the fp32 bytes. For decoding steps (at most 16
rows, no autograd) the matmul is lmforge's own kernel (``lmforge.kernels.stream_linear_int8``: int8 weights
converted to fp32 in registers, fp32 activations and accumulation) where it could be built. Otherwise it is
torch's CPU weight-only int8 kernel (``torch._weight_int8pack_mm``), which is fast with bf16 activations (its fp32
path is a slow reference loop), so the input of each quantized matmul is rounded to bf16, the kernel
accumulates in fp32, and the per-channel scale and bias are applied in fp32 afterwards. Everything else
(embeddings, norms, attention, residual stream, logits) stays fp32. Where the kernel is missing, the
weight is dequantized on the fly (same numbers, slower).

A tied output head (GPT-2 shares ``lm_head.weight`` with the token embedding) gets its own int8 copy; the
embedding used for lookups stays fp32. A quantized model is for inference only: it cannot be trained or
saved as an lmforge checkpoint (save the fp32 model and quantize when loading).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import UserError
from .kernels import stream_linear_int8
from .models import replace_module

QUANTIZE_KINDS = ("none", "int8")


def _has_int8pack() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


class QuantLinear(nn.Module):
    """An inference-only replacement for ``nn.Linear`` with int8 weights and per-output-channel scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        # The kernel takes per-channel scales in the activation dtype; ones keep them exact, and the
        # fp32 scale is applied afterwards.
        self.register_buffer("_unit", torch.ones(out_features, dtype=torch.bfloat16), persistent=False)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.use_kernel = _has_int8pack()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QuantLinear":
        w = linear.weight.detach().float()
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None).to(w.device)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q.weight_int8.copy_(torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        q.scale.copy_(scale)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach().float())
        return q

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = stream_linear_int8(x, self.weight_int8, self.scale, self.bias)
        if y is not None:
            return y
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.use_kernel and x2.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight_int8, self._unit)
            y = y.float() * self.scale
        else:
            y = F.linear(x2.float(), self.dequantized_weight())
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_model(model: nn.Module, kind: str = "int8",
                   include: Optional[Callable[[str, nn.Linear], bool]] = None) -> nn.Module:
    """Swap the ``nn.Linear`` modules of ``model`` (in place) for ``QuantLinear``; returns the model.

    kind: "int8" (weight-only, per output channel) or "none" (no change).
    include(name, linear): which layers to quantize; default all of them, the output head included.
    """
    if kind not in QUANTIZE_KINDS:
        raise UserError(f"quantize: unknown kind {kind!r} (choose from {', '.join(QUANTIZE_KINDS)})")
    if kind == "none":
        return model
    from .packed import unpack_linears

    unpack_linears(model)  # a model from LM.load holds oneDNN-packed layers: quantize their dense weights
    if next(model.parameters()).dtype != torch.float32:
        model.float()  # quantize from fp32 weights; the non-quantized parts run in fp32 too
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and (include is None or include(name, mod))]
    if not targets:
        raise UserError("quantize: the model has no linear layers to quantize (is it quantized already?)")
    for name, linear in targets:
        replace_module(model, name, QuantLinear.from_linear(linear))
    model.eval()
    model.quantized = kind  # noqa: B010  (marks the model: inference only, not saveable)
    return model


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantized", "none") != "none" or any(isinstance(m, QuantLinear) for m in model.modules())
