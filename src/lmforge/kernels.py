"""Compiled CPU kernels, built on first use with the system C compiler (sources in ``csrc/``).

``stream_linear(x, weight, bias)`` is ``F.linear`` for fp32 inputs of a few rows (decoding steps, short
prefills); ``stream_linear_int8`` the same with an int8 weight and one fp32 scale per output row
(lmforge.quantize), converting the weights to fp32 in registers. Such a product reads every weight once
and does two flops per weight read, so its speed is the speed at which the weights stream from memory; the
kernel gives each thread a contiguous band of rows and keeps every output of a block of rows in vector
registers, which streamed GPT-2's matrices at 42-53 GB/s on a 2-core Zen 4 where torch's one-row
``F.linear`` got 13-18 and oneDNN's packed inner product 21-35 (one run of ``python -m bench.gemv``,
docs/benchmarks.md).

``gelu_tanh`` is GPT-2's GELU, forward and backward, for training and inference: torch's CPU ``tanh`` is
slow, and the kernel computes the same function through one exp. ``causal_attention`` is causal
self-attention, forward and backward, for fp32 blocks of CPU training and prefill (up to 3072 positions of
64-wide heads, ``MAX_ATTENTION_TD``; ``python -m bench.activations`` times both against torch's).
``use_cpu_kernels(model)`` swaps both in from the outside, and with them ``linear`` for the model's linear
layers: torch's own oneDNN inner product for the forward and input-gradient products of fp32 CPU training,
which ran faster than the MKL sgemm behind ``F.linear`` (no compiler needed). The same library holds a whole
decoding step of a decoder (``csrc/decode_step.c``), which ``lmforge.fused`` describes the model to.

The sources are compiled once per CPU model with ``-O3 -march=native -fopenmp`` into
``~/.cache/lmforge/kernels`` (``LMFORGE_KERNEL_DIR`` moves it) and loaded with ctypes; the library's OpenMP
runtime is the one torch has already loaded (the same ``libgomp.so.1``), so it uses torch's threads and
thread count. The built library is checked against torch's own results before it is used. Where there is
no C compiler, or the build or the check fails, ``kernel_available()`` is False and callers keep torch's
kernels; ``LMFORGE_CPU_KERNELS=0`` turns the kernels off.

``hugepage_empty(numel)`` allocates fp32 memory that Linux backs with 2 MB pages where transparent huge
pages are enabled (``madvise`` mode included), so streaming weights costs fewer TLB misses.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .models.layers import ScaledDotProductAttention

log = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
SOURCES = (_CSRC / "stream_linear.c", _CSRC / "gelu.c", _CSRC / "decode_step.c", _CSRC / "attention.c",
           _CSRC / "softmax.c", _CSRC / "peak.c", _CSRC / "transpose.c")
HEADERS = (_CSRC / "kernels.h",)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi", "-shared", "-fPIC"]
# The most rows the kernels take. fp32: at 32 rows the kernel still beat F.linear and came within 20% of
# oneDNN's packed inner product (python -m bench.gemv --rows 1 8 32); beyond 64 the rows of x no longer
# stay in the L2 cache while it streams W, and F.linear (BLAS gemm, blocked for caches) takes over. int8
# converts the weights again for every 4 rows of x, so it stops at decoding-sized products.
MAX_ROWS = 64
MAX_ROWS_INT8 = 16

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False


def _cpu_id() -> str:
    """What -march=native depends on: the architecture, and on Linux the CPU model and feature flags."""
    parts = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    parts.append(line.strip())
                if line.strip() == "":  # the first processor is enough
                    break
    except OSError:
        pass
    return "\n".join(parts)


def kernel_dir() -> Path:
    return Path(os.environ.get("LMFORGE_KERNEL_DIR") or Path.home() / ".cache" / "lmforge" / "kernels")


def _build(compiler: str) -> Path:
    source = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    key = hashlib.sha256(source + " ".join([compiler] + FLAGS).encode() + _cpu_id().encode()).hexdigest()[:16]
    out = kernel_dir() / f"lmforge-cpu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-lm", "-o", tmp], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent build or a crash never leaves a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _self_test(lib: ctypes.CDLL) -> bool:
    g = torch.Generator().manual_seed(0)
    for rows, n, k in ((1, 37, 50), (3, 21, 64), (7, 9, 33), (16, 24, 80)):
        w, x, b = (torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g), torch.randn(n, generator=g))
        y = torch.empty(rows, n)
        lib.lmf_stream_linear_f32(w.data_ptr(), x.data_ptr(), b.data_ptr(), y.data_ptr(), rows, n, k)
        if not torch.allclose(y, F.linear(x, w, b), rtol=1e-4, atol=1e-4):
            return False
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        scale = torch.rand(n, generator=g) / 100
        lib.lmf_stream_linear_i8(q.data_ptr(), scale.data_ptr(), x.data_ptr(), b.data_ptr(), y.data_ptr(), rows, n, k)
        if not torch.allclose(y, F.linear(x, q.float() * scale[:, None], b), rtol=1e-4, atol=1e-4):
            return False
    q, k, v = torch.randn(3, 2, 3, 19, 16, generator=g).unbind(0)
    o, lse = torch.empty_like(q), torch.empty(2, 3, 19)
    if lib.lmf_causal_attention_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
                                    2, 3, 19, 16, *map(_strides, (q, k, v, o)), 0.25) != 0:
        return False
    if not torch.allclose(o, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-4, atol=1e-5):
        return False
    if not _softmax_chunk_matches(lib, g):
        return False
    for rows, cols in ((16, 16), (37, 50), (50, 37)):  # whole tiles, and edges on both sides
        a = torch.randn(rows, cols + 3, generator=g)[:, 1:cols + 1]
        t, colsum = torch.empty(cols, rows), torch.empty(cols)
        lib.lmf_transpose_f32(a.data_ptr(), rows, cols, a.stride(0), t.data_ptr(), colsum.data_ptr())
        if not (torch.equal(t, a.t()) and torch.allclose(colsum, a.sum(0), rtol=1e-5, atol=1e-5)):
            return False
    x = torch.linspace(-12, 12, 1001)
    y, dx, g = torch.empty_like(x), torch.empty_like(x), torch.ones_like(x)
    lib.lmf_gelu_tanh_f32(x.data_ptr(), y.data_ptr(), x.numel())
    lib.lmf_gelu_tanh_backward_f32(g.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel())
    return (torch.allclose(y, F.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)
            and torch.allclose(dx, torch.ops.aten.gelu_backward(g, x, approximate="tanh"), rtol=1e-5, atol=1e-5))


def _softmax_chunk_matches(lib: ctypes.CDLL, g: torch.Generator) -> bool:
    """Two chunks of 70 x 83 logits through ``lmf_softmax_chunk_f32`` against torch's softmax over both."""
    a, b = torch.randn(70, 83, generator=g) * 4, torch.randn(70, 83, generator=g) * 4 + 3
    m, s = torch.full((83,), float("-inf")), torch.zeros(83)
    ea, eb = a.clone(), b.clone()
    lib.lmf_softmax_chunk_f32(ea.data_ptr(), 70, 83, m.data_ptr(), s.data_ptr())
    m_a = m.clone()
    lib.lmf_softmax_chunk_f32(eb.data_ptr(), 70, 83, m.data_ptr(), s.data_ptr())
    p = torch.cat([ea * torch.exp(m_a - m), eb]) / s
    both = torch.cat([a, b])
    return (torch.allclose(p, torch.softmax(both, 0), rtol=1e-5, atol=1e-7)
            and torch.allclose(m + s.log(), torch.logsumexp(both, 0), rtol=1e-6, atol=1e-5))


def softmax_chunk_(E: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> bool:
    """One chunk of the chunked head loss, in place (csrc/softmax.c): with E [rows, cols] of logits and each
    column's running maximum ``m`` and sum ``s`` of exponentials, set m' = max(m, max over rows of E),
    s = s * exp(m - m') + sum over rows of exp(E - m'), E = exp(E - m'), m = m'. All contiguous fp32 CPU
    tensors. Returns False, changing nothing, where the kernels are not available."""
    lib = _lib if _tried else load_kernel()
    if lib is None:
        return False
    rows, cols = E.shape
    if not (E.is_contiguous() and m.is_contiguous() and s.is_contiguous() and m.numel() == cols == s.numel()
            and E.dtype == m.dtype == s.dtype == torch.float32):
        raise ValueError("softmax_chunk_ takes a contiguous fp32 [rows, cols] chunk and [cols] running sums")
    lib.lmf_softmax_chunk_f32(E.data_ptr(), rows, cols, m.data_ptr(), s.data_ptr())
    return True


class _Strides(ctypes.Structure):
    _fields_ = [("b", ctypes.c_long), ("h", ctypes.c_long), ("t", ctypes.c_long)]


def load_kernel() -> Optional[ctypes.CDLL]:
    """The compiled kernel library, building it if needed; None where it cannot be built or is turned off."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("LMFORGE_CPU_KERNELS", "1") == "0":
            return None
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if compiler is None or not all(p.exists() for p in SOURCES + HEADERS):
            log.info("lmforge.kernels: no C compiler; using torch's kernels")
            return None
        try:
            lib = ctypes.CDLL(str(_build(compiler)))
            for name, pointers, sizes in (("lmf_stream_linear_f32", 4, 3), ("lmf_stream_linear_i8", 5, 3),
                                          ("lmf_gelu_tanh_f32", 2, 1), ("lmf_gelu_tanh_backward_f32", 3, 1)):
                fn = getattr(lib, name)
                fn.restype = None
                fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_long] * sizes
            for name, pointers, strides in (("lmf_causal_attention_fwd", 5, 4), ("lmf_causal_attention_bwd", 9, 8)):
                fn = getattr(lib, name)
                fn.restype = ctypes.c_int  # 0, or -1 when out of memory
                fn.argtypes = ([ctypes.c_void_p] * pointers + [ctypes.c_long] * 4 + [_Strides] * strides
                               + [ctypes.c_float])
            lib.lmf_transpose_f32.restype = None
            lib.lmf_transpose_f32.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_void_p] * 2
            lib.lmf_fma_loop.restype = ctypes.c_double
            lib.lmf_fma_loop.argtypes = [ctypes.c_long]
            lib.lmf_softmax_chunk_f32.restype = None
            lib.lmf_softmax_chunk_f32.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                                  ctypes.c_void_p]
            lib.lmf_decode_step.restype = None  # checked against the model's forward by lmforge.fused
            lib.lmf_decode_step.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            if not _self_test(lib):
                log.warning("lmforge.kernels: the built kernels disagree with torch; not using them")
                return None
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
            log.info("lmforge.kernels: could not build the CPU kernels (%s); using torch's", e)
            return None
        _lib = lib
        return _lib


def kernel_available() -> bool:
    return load_kernel() is not None


_row_invariant: Optional[bool] = None


def rows_are_independent() -> bool:
    """Whether the product kernels give each row of x the same bits whatever the number of rows beside it:
    every output is the same chain of multiply-adds over K in every block shape, so it should hold, but it
    rests on the compiler fusing them the same way in each shape, so it is checked once per process on
    shapes that reach every block kind (one row of 16 or 8 side by side, 3 x 8, 6 x 4 and the tails). The
    server relies on it to decode only the slots in use while keeping a seeded answer the same in any batch.
    False where the kernels are not available."""
    global _row_invariant
    if _row_invariant is None:
        lib = load_kernel()
        _row_invariant = lib is not None and _rows_match(lib)
    return _row_invariant


def _rows_match(lib: ctypes.CDLL) -> bool:
    g = torch.Generator().manual_seed(1)
    for n, k in ((37, 50), (40, 512), (19, 96)):
        w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        q, scale = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), torch.rand(n, generator=g)
        x = torch.randn(MAX_ROWS, k, generator=g)
        for fn, front, most in ((lib.lmf_stream_linear_f32, (w,), MAX_ROWS),
                                (lib.lmf_stream_linear_i8, (q, scale), MAX_ROWS_INT8)):
            one = torch.cat([_run(fn, x[i:i + 1], n, k, *front, b) for i in range(most)])
            for rows in (2, 3, 4, 5, 7, 8, 9, 13, most):
                if not torch.equal(_run(fn, x[:rows], n, k, *front, b), one[:rows]):
                    return False
    return True


def _applies(x: torch.Tensor, k: int, tensors: tuple, max_rows: int) -> bool:
    """Whether a kernel can take this product: fp32 CPU input of 1..max_rows rows and no autograd."""
    rows = x.numel() // k if k else 0
    if rows == 0 or rows > max_rows or x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors)))


def _run(fn, x: torch.Tensor, n: int, k: int, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """Call a product kernel ``fn(W, [scale,] x, b, y, M, N, K)``: ``tensors`` are the contiguous arguments
    before x, then the bias."""
    *front, bias = tensors
    x2 = x.reshape(-1, k).contiguous()
    b = None if bias is None else bias.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    fn(*[t.data_ptr() for t in front], x2.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
       x2.shape[0], n, k)
    return y


def stream_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; through the kernel when it applies (fp32 CPU tensors, a contiguous
    weight, at most ``MAX_ROWS`` rows, no autograd), else through ``F.linear``."""
    n, k = weight.shape
    lib = _lib if _tried else load_kernel()
    if (lib is None or weight.dtype != torch.float32 or not weight.is_contiguous()
            or (bias is not None and bias.dtype != torch.float32)
            or not _applies(x, k, (weight, bias), MAX_ROWS)):
        return F.linear(x, weight, bias)
    return _run(lib.lmf_stream_linear_f32, x, n, k, weight, bias)


def stream_linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``x W^T * scale + bias`` for an int8 ``weight`` [N, K] and fp32 ``scale`` [N], in fp32 throughout;
    None where the kernel does not apply (the caller uses its own path)."""
    n, k = weight.shape
    lib = _lib if _tried else load_kernel()
    if (lib is None or weight.dtype != torch.int8 or scale.dtype != torch.float32 or not weight.is_contiguous()
            or not scale.is_contiguous() or (bias is not None and bias.dtype != torch.float32)
            or not _applies(x, k, (weight, scale, bias), MAX_ROWS_INT8)):
        return None
    return _run(lib.lmf_stream_linear_i8, x, n, k, weight, scale, bias)


def transpose(x: torch.Tensor, column_sums: bool = False):
    """``x.t().contiguous()`` for a 2-D tensor; fp32 CPU ones whose rows are contiguous through the kernel
    (16 x 16 tiles transposed in registers, several times faster than torch's copy). With ``column_sums``,
    returns ``(x.t().contiguous(), x.sum(0))``, the sums taken on the kernel's way through (to fp32
    rounding). Tensors that need a gradient take torch's copy, which autograd follows."""
    lib = _lib if _tried else load_kernel()
    if (lib is None or x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(1) != 1
            or x.numel() == 0 or (x.requires_grad and torch.is_grad_enabled())):
        t = x.t().contiguous()
        return (t, x.sum(0)) if column_sums else t
    out = torch.empty(x.shape[1], x.shape[0])
    sums = torch.empty(x.shape[1]) if column_sums else None
    lib.lmf_transpose_f32(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(),
                          sums.data_ptr() if column_sums else None)
    return (out, sums) if column_sums else out


def _gelu_applies(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() and x.numel() > 0


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(x)
        _lib.lmf_gelu_tanh_f32(x.data_ptr(), y.data_ptr(), x.numel())
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch.empty_like(x)
        _lib.lmf_gelu_tanh_backward_f32(grad.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel())
        return dx


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` (GPT-2's GELU), forward and backward through the kernel for
    contiguous fp32 CPU tensors: torch's CPU tanh is the slow part of its version
    (``python -m bench.activations`` times both, ``python -m bench.train_step`` the effect on a step)."""
    lib = _lib if _tried else load_kernel()
    if lib is None or not _gelu_applies(x):
        return F.gelu(x, approximate="tanh")
    return _GeluTanh.apply(x)


class KernelGELU(torch.nn.GELU):
    """``nn.GELU(approximate="tanh")`` computed by ``gelu_tanh``; made in place by ``use_cpu_kernels``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


# ------------------------------------------------------------------------------------------------------
# Linear layers for fp32 CPU training through oneDNN, which torch ships beside MKL. torch's F.linear and mm
# call MKL's sgemm; oneDNN's fp32 inner product, reached through torch.ops.mkldnn._linear_pointwise (the op
# torch's own compiler emits for CPU linears), ran the forward and input-gradient products of GPT-2's
# layers faster on a Zen 4 (python -m bench.train_step --compare-linear times the step both ways). The
# weight gradient (a reduction over the tokens) is fast through oneDNN only with the output gradient
# transposed into a buffer of its own as the row operand (python -m bench.activations times the three ways).
# torch's transposing copy costs about as much as that gains, except where the layer has more inputs than
# outputs (GPT-2's fc2: the gradient is the small side); lmforge's transpose kernel (csrc/transpose.c, several
# times faster) makes it pay for every layer, so with the kernels built every weight gradient goes through
# oneDNN, without them only those of layers with more inputs than outputs.

_onednn_ok: Optional[bool] = None
# Products smaller than this many multiply-adds stay with F.linear: a oneDNN call has a fixed cost of tens of
# microseconds, more than it gains on a small product. With this limit at 0, python -m bench.train_step
# --config tiny --rounds 7 --reps 20 --compare-linear (2 layers, 32 wide) timed lmforge's step at 3.1 ms
# against 2.2 ms with F.linear; the char config's products, around this size, came out even.
ONEDNN_MIN_MACS = 1 << 25


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_linear_available() -> bool:
    """Whether ``linear`` computes through oneDNN here: torch built with it, ``LMFORGE_ONEDNN_LINEAR`` not 0,
    and the op agreeing with torch's products once, in every orientation the layer uses (checked once per
    process)."""
    global _onednn_ok
    if _onednn_ok is None:
        _onednn_ok = _onednn_check()
    return _onednn_ok


def _onednn_check() -> bool:
    if os.environ.get("LMFORGE_ONEDNN_LINEAR", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(37, 50, generator=g), torch.randn(29, 50, generator=g), torch.randn(29, generator=g)
    gy = torch.randn(37, 29, generator=g)
    try:
        pairs = ((_onednn(x, w, b), F.linear(x, w, b)), (_onednn(gy, w.t()), gy @ w),
                 (_onednn(gy.t().contiguous(), x.t()), gy.t() @ x))
    except (RuntimeError, AttributeError, NotImplementedError) as e:  # an op this build of torch lacks
        log.info("lmforge.kernels: oneDNN linear unavailable (%s); using F.linear", e)
        return False
    return all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in pairs)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return _onednn(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn(g2, weight.t()).view(*grad.shape[:-1], weight.shape[1])
        want_db = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1] and (kernel_available() or weight.shape[1] > weight.shape[0]):
            # The gradient, transposed into a buffer of its own, is oneDNN's row operand and the inputs its
            # (transposed) weight operand; see above for when this beats MKL's product. The bias gradient is
            # summed on the transpose's way through.
            gT, db = transpose(g2, column_sums=True) if want_db else (transpose(g2), None)
            dw = _onednn(gT, x2.t())
        elif ctx.needs_input_grad[1]:
            dw = g2.t().mm(x2)
        if want_db and db is None:
            db = g2.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; for fp32 CPU tensors outside autocast and torch.compile, and products of
    at least ``ONEDNN_MIN_MACS`` multiply-adds, its products through oneDNN (``onednn_linear_available``):
    the forward and the input gradient directly, the weight gradient from the output gradient transposed by
    ``transpose`` (which also sums the bias gradient), or through torch's mm for layers with fewer inputs
    than outputs where the kernels are not built. The same function to fp32 rounding."""
    if (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.numel() * weight.shape[0] >= max(ONEDNN_MIN_MACS, 1)
            and (bias is None or bias.dtype == torch.float32)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and onednn_linear_available()):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class KernelLinear(torch.nn.Linear):
    """``nn.Linear`` computed by ``linear``; made in place by ``use_cpu_kernels`` for fp32 CPU training."""

    plain_linear = True  # computes exactly F.linear(x, self.weight, self.bias): the chunked head loss takes it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_cpu_kernels(model: torch.nn.Module) -> int:
    """Swap, in place, the modules of ``model`` that lmforge's CPU kernels compute faster (GPT-2's tanh
    GELU, causal self-attention, and linear layers through oneDNN) for their kernel versions: same
    functions, the same parameters, so checkpoints do not change. Returns how many were swapped (0 where
    neither the kernels nor oneDNN are available)."""
    kernels, dnn = kernel_available(), onednn_linear_available()
    found = 0
    for m in model.modules():
        if kernels and type(m) is torch.nn.GELU and m.approximate == "tanh":
            m.__class__ = KernelGELU
        elif kernels and type(m) is ScaledDotProductAttention:
            m.__class__ = KernelAttention
        elif dnn and type(m) is torch.nn.Linear:
            m.__class__ = KernelLinear
        else:
            continue
        found += 1
    return found


_HUGE = 2 << 20


def hugepage_empty(numel: int) -> torch.Tensor:
    """An uninitialized fp32 tensor of ``numel`` elements in memory advised for transparent huge pages
    (a plain ``torch.empty`` where that advice does not exist). The mapping is freed with the last tensor
    that views it."""
    nbytes = numel * 4
    if not hasattr(mmap, "MADV_HUGEPAGE") or nbytes < _HUGE:
        return torch.empty(numel)
    m = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))
    offset = (-address) % _HUGE  # start on a 2 MB boundary so whole huge pages fit
    return torch.frombuffer(m, dtype=torch.float32, count=numel, offset=offset)


def _strides(t: torch.Tensor) -> _Strides:
    return _Strides(*t.stride()[:3])


def _bthd(B: int, H: int, T: int, D: int) -> torch.Tensor:
    """An empty [B, H, T, D] tensor laid out as [B, T, H, D]: the layout the heads are joined back in."""
    return torch.empty(B, T, H, D).transpose(1, 2)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, T, D = q.shape
        o, lse = _bthd(B, H, T, D), torch.empty(B, H, T)
        scale = 1.0 / D ** 0.5
        if _lib.lmf_causal_attention_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
                                         B, H, T, D, _strides(q), _strides(k), _strides(v), _strides(o), scale):
            raise MemoryError("causal_attention: out of memory")
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        dq, dk, dv = _bthd(B, H, T, D), _bthd(B, H, T, D), _bthd(B, H, T, D)
        scale = 1.0 / D ** 0.5
        if _lib.lmf_causal_attention_bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
                                         grad.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), B, H, T, D,
                                         *map(_strides, (q, k, v, o, grad, dq, dk, dv)), scale):
            raise MemoryError("causal_attention: out of memory")
        return dq, dk, dv


# The largest head the attention kernel takes, in elements of its keys (T x D), and the widest head: it
# beats torch's flash kernel while a head's packed keys (T x D floats, 768 KB at this limit) stay in a 1 MB
# L2 cache, and loses to SDPA's blocked matrix products beyond (python -m bench.activations times both).
MAX_ATTENTION_TD = 3072 * 64
MAX_ATTENTION_D = 256


def attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``causal_attention`` takes these tensors: fp32 CPU [B, H, T, D] of one shape, D a multiple of
    16 up to ``MAX_ATTENTION_D``, T x D at most ``MAX_ATTENTION_TD``, each with a contiguous last dimension."""
    return (q.dim() == 4 and q.shape == k.shape == v.shape and q.shape[2] > 0
            and 0 < q.shape[3] <= MAX_ATTENTION_D and q.shape[3] % 16 == 0
            and q.shape[2] * q.shape[3] <= MAX_ATTENTION_TD
            and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1 for t in (q, k, v)))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` for fp32 CPU tensors [B, H, T, D] (the
    same number of heads in each), forward and backward through lmforge's kernel where it applies
    (``attention_applies``), else through torch's."""
    lib = _lib if _tried else load_kernel()
    if lib is None or not attention_applies(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return _CausalAttention.apply(q, k, v)


class KernelAttention(ScaledDotProductAttention):
    """A model's attention through ``causal_attention`` for plain causal self-attention without a mask or
    dropout (which itself keeps SDPA for tensors the kernel does not take), else through torch's SDPA; made
    in place by ``use_cpu_kernels``."""

    def forward(self, q_BHTD, k_BHSD, v_BHSD, mask=None, dropout_p=0.0, is_causal=False):
        if is_causal and mask is None and dropout_p == 0.0:
            return causal_attention(q_BHTD, k_BHSD, v_BHSD)
        return super().forward(q_BHTD, k_BHSD, v_BHSD, mask, dropout_p, is_causal)
