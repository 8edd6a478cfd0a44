"""fp32 linear layers laid out for fast CPU inference: lmforge's streaming kernel, or oneDNN's packed form.

Where ``lmforge.kernels`` could build its C kernel (a C compiler is present), ``pack_linears`` turns each
``nn.Linear`` into a ``StreamLinear``: the same module with the same parameters (ties kept, trains,
saves and pickles as an ``nn.Linear``), whose forward runs the kernel for products of at most 64 rows and
``F.linear`` otherwise, with the weights moved into memory backed by huge pages. That is the fastest
decoding path measured here (``python -m bench.gemv``, ``python -m bench.decode``). Without the kernel it
falls back to oneDNN's packed form, described next.

Decoding one token reads every weight matrix once and multiplies it by a single row: a matrix-vector
product whose speed is set by how fast the weights stream from memory. For that shape torch's default
fp32 path (``F.linear`` -> BLAS gemm with M = 1) streams GPT-2-sized matrices at about 13 GB/s on a
2-core AMD EPYC (Zen 4), while oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise`` on a
weight reordered once by ``torch.ops.mkldnn._reorder_linear_weight``, the kernels inductor uses for
frozen CPU graphs) uses every core and reaches 19-27 GB/s; with 8 rows it is 1.2-2.6x faster than
``F.linear`` (``python -m bench.gemv``; ``python -m bench.decode`` measures the end-to-end effect).

``pack_linears(model)`` swaps each ``nn.Linear`` of an inference model for a ``PackedLinear`` holding
the reordered weight, from the outside (house rule 3: the model's forward stays plain). The arithmetic
is the same fp32 product; only the summation order inside the kernel differs (~1e-6 relative). The
packed weight replaces the dense one (no second copy), except that a tied output head gets its own
packed copy next to the embedding used for lookups. ``state_dict()`` still returns dense ``weight``
tensors under the usual names (and ``.weight`` reads back a dense copy), so a packed model saves, exports,
pickles and deep-copies like any other. Moved to another dtype or device (``model.to(...)``) a layer
keeps a dense weight and runs ``F.linear``; back in fp32 on the CPU it packs again. Its weights do not
train (the packed kernel has no backward): with gradients on, a layer still passes gradients to its
input through a dense copy of the weight, and ``unpack_linears`` gives trainable ``nn.Linear`` layers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import KernelLinear, hugepage_empty, kernel_available, stream_linear
from .models import replace_module


def packing_available() -> bool:
    """True where torch has oneDNN's fp32 inner product (x86/aarch64 CPU builds)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2), 1)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), w, None, "none", [], "")
        return bool(torch.equal(y, torch.full((1, 2), 2.0)))
    except (RuntimeError, AttributeError):
        return False


def _packable(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.float32


class PackedLinear(nn.Module):
    """``nn.Linear`` for fp32 CPU inference with its weight in oneDNN's packed form."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 1):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.batch_hint = batch_hint
        self.packed: Optional[torch.Tensor] = None
        self.dense: Optional[torch.Tensor] = None  # used instead where the weight is not fp32 on the CPU
        self._set_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def _set_weight(self, w: torch.Tensor) -> None:
        if _packable(w):
            self.packed, self.dense = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), self.batch_hint), None
        else:
            self.packed, self.dense = None, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.dense, self.bias)
        if torch.is_grad_enabled() and x.requires_grad:  # the packed kernel has no backward
            return F.linear(x, self.dense_weight(), self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def dense_weight(self) -> torch.Tensor:
        return self.packed.to_dense() if self.packed is not None else self.dense

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of the weight (writing to it does not change the layer; load a state dict)."""
        return self.dense_weight()

    def to_linear(self) -> nn.Linear:
        w = self.dense_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # the bias
        self._set_weight(fn(self.dense_weight()))
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        state["packed"], state["dense"] = None, self.dense_weight()  # opaque oneDNN tensors do not pickle
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._set_weight(self.dense)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" in state_dict:
            w = state_dict[prefix + "weight"]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {prefix}weight: {tuple(w.shape)} vs "
                                  f"{(self.out_features, self.in_features)}")
                return
            current = self.dense_weight()
            self._set_weight(w.detach().to(device=current.device, dtype=current.dtype))
        elif strict:
            missing_keys.append(prefix + "weight")
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            elif strict:
                missing_keys.append(prefix + "bias")
        if strict:
            known = {prefix + "weight", prefix + "bias"}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known
                                   and "." not in k[len(prefix):])

    def extra_repr(self) -> str:
        how = "oneDNN packed fp32" if self.packed is not None else f"dense {self.dense.dtype}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {how}"


class StreamLinear(nn.Linear):
    """``nn.Linear`` whose forward runs ``lmforge.kernels.stream_linear`` (the compiled memory-bound kernel for
    a few fp32 rows without autograd, ``F.linear`` for everything else). Made from an ``nn.Linear`` in place
    by ``pack_linears``; its parameters stay the layer's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stream_linear(x, self.weight, self.bias)


def _to_hugepages(params: list[nn.Parameter]) -> None:
    """Move each parameter's data (once, however many modules share it) into huge-page-backed memory."""
    seen: set[int] = set()
    for p in params:
        if id(p) in seen or p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous():
            continue
        seen.add(id(p))
        moved = hugepage_empty(p.numel()).view(p.shape)
        if moved.data_ptr() != p.data_ptr():
            moved.copy_(p.detach())
            p.data = moved


def _swap(model: nn.Module, kind: type, make) -> int:
    targets = [(name, mod) for name, mod in model.named_modules() if type(mod) is kind]
    for name, mod in targets:
        replace_module(model, name, make(mod))
    return len(targets)


def pack_linears(model: nn.Module, batch_hint: int = 1) -> int:
    """Lay out every fp32 CPU ``nn.Linear`` of ``model`` for fast inference (in place, eval mode):
    ``StreamLinear`` where lmforge's kernel is available, else ``PackedLinear`` (oneDNN); returns how many
    layers changed (0 where neither applies or the model is not fp32 on the CPU)."""
    p: Optional[torch.Tensor] = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype != torch.float32:
        return 0
    for m in model.modules():  # a model trained in this process: its training-time linears are plain again
        if type(m) is KernelLinear:
            m.__class__ = nn.Linear
    if kernel_available():
        model.eval()
        layers = [m for m in model.modules() if type(m) is nn.Linear]
        _to_hugepages([m.weight for m in layers])
        for m in layers:
            m.__class__ = StreamLinear
        return len(layers)
    if not packing_available():
        return 0
    model.eval()
    return _swap(model, nn.Linear, lambda lin: PackedLinear(lin, batch_hint))


def unpack_linears(model: nn.Module) -> int:
    """Undo ``pack_linears``: plain ``nn.Linear`` modules again (a tied head packed by oneDNN becomes
    untied; a ``StreamLinear`` keeps its parameters, ties included)."""
    streams = [m for m in model.modules() if type(m) is StreamLinear]
    for m in streams:
        m.__class__ = nn.Linear
    return len(streams) + _swap(model, PackedLinear, PackedLinear.to_linear)


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, (PackedLinear, StreamLinear)) for m in model.modules())
