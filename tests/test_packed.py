"""fp32 linear layers laid out for CPU inference (lmforge.packed: lmforge's streaming kernel, or oneDNN's
packed form): same outputs as nn.Linear, same state_dict, and LM.load uses them on the CPU without changing
what saves or exports."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig, UserError
from lmforge.models import build_model
from lmforge import kernels
from lmforge.packed import PackedLinear, StreamLinear, is_packed, pack_linears, packing_available, unpack_linears
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN fp32 linear")


needs_kernel = pytest.mark.skipif(not kernels.kernel_available(), reason="lmforge's CPU kernel could not be built")


@pytest.fixture(params=["stream", "onednn"])
def layout(request, monkeypatch):
    """Run a test with lmforge's kernel (StreamLinear) and with oneDNN's packed form (PackedLinear)."""
    if request.param == "stream":
        if not kernels.kernel_available():
            pytest.skip("lmforge's CPU kernel could not be built")
        return StreamLinear
    monkeypatch.setattr("lmforge.packed.kernel_available", lambda: False)
    return PackedLinear


def _model(tie: bool = True, bias: bool = True):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, block_size=64, n_layers=2, n_heads=4, d_model=64, pos="learned",
                      norm="layernorm", mlp="gelu_tanh", bias=bias, tie_embeddings=tie)
    return build_model(cfg).eval()


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_linear_and_keeps_its_state(bias):
    torch.manual_seed(1)
    lin = nn.Linear(48, 40, bias=bias)
    packed = PackedLinear(lin)
    with torch.inference_mode():
        for shape in [(1, 48), (3, 7, 48), (5, 1, 48)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-5)
    ref, got = lin.state_dict(), packed.state_dict()
    assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    other = nn.Linear(48, 40, bias=bias)
    packed.load_state_dict(other.state_dict())
    with torch.inference_mode():
        x = torch.randn(2, 48)
        torch.testing.assert_close(packed(x), other(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="size mismatch"):
        packed.load_state_dict(nn.Linear(40, 48, bias=bias).state_dict())
    x = torch.randn(2, 48, requires_grad=True)  # gradients still reach the input (the weight stays fixed)
    packed(x).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    other(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.weight, other.weight.detach())


def test_packed_linear_copies_pickles_and_changes_dtype():
    import copy
    import io

    torch.manual_seed(2)
    lin = nn.Linear(32, 24)
    packed = PackedLinear(lin)
    x = torch.randn(3, 32)
    with torch.inference_mode():
        want = lin(x)
        torch.testing.assert_close(copy.deepcopy(packed)(x), want, rtol=1e-5, atol=1e-5)
        buf = io.BytesIO()
        torch.save(packed, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.load(buf, weights_only=False)(x), want, rtol=1e-5, atol=1e-5)
        packed.to(torch.bfloat16)  # not packable: a dense bf16 weight and F.linear
        assert packed.packed is None and packed.weight.dtype == torch.bfloat16
        torch.testing.assert_close(packed(x.bfloat16()).float(), want, rtol=2e-2, atol=5e-2)
        packed.float()  # fp32 on the CPU again: packed again
        assert packed.packed is not None
        torch.testing.assert_close(packed(x), want, rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match="Unexpected"):
        packed.load_state_dict({**lin.state_dict(), "extra": torch.zeros(1)})


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_stream_linear_matches_f_linear_for_every_shape(bias):
    torch.manual_seed(2)
    for n, k in ((40, 48), (37, 50), (9, 33), (100, 16), (8, 3), (41, 768), (19, 1024)):  # 768, 1024: 16 and 8 rows
        w = torch.randn(n, k)
        b = torch.randn(n) if bias else None
        tol = dict(rtol=1e-5, atol=max(1e-5, 3e-6 * k ** 0.5))  # sums of k products of order 1 round at ~sqrt(k)
        for rows in (1, 2, 3, 4, 5, 8, 15, 16, 17, 40, 64, 65):
            x = torch.randn(rows, k)
            torch.testing.assert_close(kernels.stream_linear(x, w, b), F.linear(x, w, b), **tol)
        x3 = torch.randn(2, 3, k)  # leading dimensions are kept
        torch.testing.assert_close(kernels.stream_linear(x3, w, b), F.linear(x3, w, b), **tol)
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = torch.rand(n) / 50
        for rows in (1, 3, 8, 11, 16):
            x = torch.randn(rows, k)
            torch.testing.assert_close(kernels.stream_linear_int8(x, q, scale, b),
                                       F.linear(x, q.float() * scale[:, None], b), **tol)
        assert kernels.stream_linear_int8(torch.randn(kernels.MAX_ROWS_INT8 + 1, k), q, scale, b) is None
    w, b = torch.randn(5, 16), (torch.randn(5) if bias else None)
    x = torch.randn(1, 16, requires_grad=True)  # autograd goes through F.linear
    kernels.stream_linear(x, w, b).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, w.sum(0).expand(1, 16))


def test_kernel_builds_where_there_is_a_compiler():
    # A kernel that disagrees with torch turns every kernel off quietly (callers keep torch's ops); on a
    # machine with a compiler that must not happen unnoticed.
    import os
    import shutil

    if os.environ.get("LMFORGE_CPU_KERNELS", "1") == "0" or not (os.environ.get("CC") or shutil.which("gcc")):
        pytest.skip("no C compiler, or the kernels are turned off")
    assert kernels.kernel_available()


def test_kernels_build_with_the_older_gcc_shuffle(monkeypatch, tmp_path):
    """GCC before 12 has no __builtin_shufflevector: the transpose kernel then uses __builtin_shuffle (forced
    here with LMF_OLD_SHUFFLE), and the library still passes its self-test."""
    import shutil

    if not shutil.which("gcc") or not kernels.kernel_available():
        pytest.skip("no gcc here, or the kernels do not build at all")
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "FLAGS", kernels.FLAGS + ["-DLMF_OLD_SHUFFLE"])
    monkeypatch.setenv("LMFORGE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("gcc"))
    assert kernels.load_kernel() is not None and len(list(tmp_path.glob("*.so"))) == 1


def test_kernel_is_off_without_a_compiler_or_when_turned_off(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setenv("LMFORGE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that fails
    assert kernels.load_kernel() is None and list(tmp_path.iterdir()) == []  # no half-written library left
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    torch.testing.assert_close(kernels.stream_linear(x, w), F.linear(x, w))  # torch's kernel instead
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.delenv("CC")
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    assert kernels.load_kernel() is None


def test_hugepage_memory_is_aligned_and_outlives_its_mapping():
    t = kernels.hugepage_empty(3 << 20).view(3, 1 << 20)  # 12 MB
    t.fill_(2.0)
    part = t[1]
    del t
    assert float(part.sum()) == 2.0 * (1 << 20)
    if hasattr(__import__("mmap"), "MADV_HUGEPAGE"):
        assert part.data_ptr() % (2 << 20) == (1 << 20) * 4 % (2 << 20)


def test_pack_linears_takes_the_layers_training_swapped_in(layout):
    model = _model(True)
    kernels.use_cpu_kernels(model)  # what training in this process did to it (KernelLinear where oneDNN runs)
    x = torch.randint(0, 97, (2, 20))
    with torch.inference_mode():
        want = model(x)
    assert pack_linears(model) == 2 * 4 + 1
    assert sum(type(m) is layout for m in model.modules()) == 2 * 4 + 1
    with torch.inference_mode():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_packed_model_gives_the_same_logits_and_state(tie, layout):
    model = _model(tie)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 97, (2, 20))
    one = torch.randint(0, 97, (1, 1))  # a decoding step: the kernel's case
    with torch.inference_mode():
        want, want_one = model(x), model(one)
    assert pack_linears(model) == 2 * 4 + 1 and is_packed(model)
    assert sum(type(m) is layout for m in model.modules()) == 2 * 4 + 1
    if layout is StreamLinear and tie:
        assert model.lm_head.weight is model.tok_emb.weight  # still one tensor
    with torch.inference_mode():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(one), want_one, rtol=1e-4, atol=1e-5)
    got = model.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    assert unpack_linears(model) == 9 and not is_packed(model)
    model.train()
    model(x).sum().backward()  # trains again once unpacked


def test_lm_load_packs_on_cpu_and_saves_and_exports_unchanged(tmp_path, layout):
    from lmforge.lm import LM

    tok = Tokenizer.train_from_iterator(["hello world " * 20], "bpe", vocab_size=280, min_frequency=1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64,
                      pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
    model = build_model(cfg).eval()
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer=tok)
    lm = LM.load(ckpt)
    assert is_packed(lm.model) and not is_packed(LM.load(ckpt, pack=False).model)
    assert lm.num_params == model.num_params() == LM.load(ckpt, quantize="int8").num_params
    from lmforge.quantize import QuantLinear, quantize_model

    again = LM.load(ckpt)  # packed; quantizing it afterwards works on its dense weights
    quantize_model(again.model, "int8")
    assert sum(isinstance(m, QuantLinear) for m in again.model.modules()) == 2 * 4 + 1
    with pytest.raises(UserError, match="no linear layers"):
        quantize_model(again.model, "int8")
    x = torch.randint(0, tok.vocab_size, (1, 12))
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(x), model(x), rtol=1e-4, atol=1e-5)
    assert lm.generate("hello", max_new_tokens=8, temperature=0.0) == \
        LM.load(ckpt, pack=False).generate("hello", max_new_tokens=8, temperature=0.0)
    saved = lm.save(tmp_path / "again")
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(saved / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    lm.export_hf(tmp_path / "hf")  # the exporter reads the dense weights back
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.inference_mode():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_gelu_kernel_matches_torch_forward_and_backward():
    torch.manual_seed(3)
    x = (torch.randn(37, 129) * 4).requires_grad_()
    g = torch.randn(37, 129)
    y = kernels.gelu_tanh(x)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    F.gelu(x2, approximate="tanh").backward(g)
    torch.testing.assert_close(y, F.gelu(x.detach(), approximate="tanh"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    t = torch.randn(8, 6).t()  # not contiguous, and bf16: torch's own version
    torch.testing.assert_close(kernels.gelu_tanh(t), F.gelu(t, approximate="tanh"))
    b = torch.randn(5, dtype=torch.bfloat16)
    assert kernels.gelu_tanh(b).dtype == torch.bfloat16


@needs_kernel
def test_use_cpu_kernels_swaps_gelu_and_attention_without_changing_the_model(monkeypatch):
    model = _model(tie=True).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 97, (2, 20))
    want = model(x)
    want.sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 0)  # this small model's products through oneDNN too
    dnn = kernels.onednn_linear_available()
    linears = sum(type(m) is nn.Linear for m in model.modules()) if dnn else 0  # 4 per block and the head
    assert kernels.use_cpu_kernels(model) == 4 + linears and kernels.use_cpu_kernels(model) == 0
    assert sum(type(m) is kernels.KernelGELU for m in model.modules()) == 2
    assert sum(type(m) is kernels.KernelAttention for m in model.modules()) == 2
    assert sum(type(m) is kernels.KernelLinear for m in model.modules()) == linears
    calls, products = [], []
    real = kernels._CausalAttention.apply
    monkeypatch.setattr(kernels._CausalAttention, "apply", lambda *a: calls.append(1) or real(*a))
    real_linear = kernels._OneDNNLinear.apply
    monkeypatch.setattr(kernels._OneDNNLinear, "apply", lambda *a: products.append(1) or real_linear(*a))
    got = model(x)
    assert len(calls) == 2  # the kernel ran in both blocks
    assert len(products) == linears
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-3, atol=1e-5)
    assert list(model.state_dict()) == list(state)


@pytest.mark.skipif(not kernels.onednn_linear_available(), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("shape,bias,frozen", [((7, 50), True, False), ((2, 9, 64), False, False),
                                               ((3, 5, 33), True, True), ((4, 10), True, False)])
def test_onednn_linear_matches_f_linear_forward_and_backward(shape, bias, frozen, monkeypatch):
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 0)
    calls = []
    real = kernels._OneDNNLinear.apply
    monkeypatch.setattr(kernels._OneDNNLinear, "apply", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(*shape, generator=g)
    w0, b0 = torch.randn(24, shape[-1], generator=g), torch.randn(24, generator=g)
    grad = torch.randn(*shape[:-1], 24, generator=g)
    out = []
    for fn in (F.linear, kernels.linear):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_(not frozen)
        b = b0.clone().requires_grad_() if bias else None
        y = fn(x, w, b)
        y.backward(grad)
        out.append([y, x.grad, w.grad, b.grad if bias else None])
    assert calls == [1]
    for got, want in zip(out[1], out[0]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not kernels.onednn_linear_available(), reason="this torch build has no oneDNN linear")
def test_onednn_linear_weight_gradient_without_the_transpose_kernel(monkeypatch):
    """Without lmforge's kernels, layers with fewer inputs than outputs take MKL's weight gradient and the
    others torch's transposing copy: the gradients are the same."""
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(kernels, "_tried", True)  # as where the library could not be built
    monkeypatch.setattr(kernels, "_lib", None)
    g = torch.Generator().manual_seed(5)
    for d_in, d_out in ((10, 24), (24, 10)):
        x, w = torch.randn(6, d_in, generator=g), torch.randn(d_out, d_in, generator=g)
        grad = torch.randn(6, d_out, generator=g)
        ws = [w.clone().requires_grad_(), w.clone().requires_grad_()]
        F.linear(x, ws[0]).backward(grad)
        kernels.linear(x, ws[1]).backward(grad)
        torch.testing.assert_close(ws[1].grad, ws[0].grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows,cols", [(1, 1), (16, 16), (17, 33), (64, 48), (5, 200), (300, 7)])
def test_transpose_equals_torch(rows, cols):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    x = torch.randn(rows, cols, generator=g)
    assert torch.equal(kernels.transpose(x), x.t().contiguous())
    wide = torch.randn(rows, cols + 5, generator=g)[:, 2:cols + 2]  # rows with a stride of their own
    t = kernels.transpose(wide)
    assert torch.equal(t, wide.t()) and t.is_contiguous()
    t, sums = kernels.transpose(wide, column_sums=True)
    assert torch.equal(t, wide.t())
    torch.testing.assert_close(sums, wide.sum(0), rtol=1e-5, atol=1e-5)
    assert torch.equal(kernels.transpose(x.double()), x.double().t())  # other dtypes: torch's copy
    leaf = x.clone().requires_grad_()
    kernels.transpose(leaf).sum().backward()  # a tensor that needs a gradient keeps its graph
    assert torch.equal(leaf.grad, torch.ones_like(x))
    assert kernels.transpose(torch.empty(0, cols)).shape == (cols, 0)


def test_transpose_column_sums_of_long_columns_stay_accurate():
    x = torch.rand(65536, 48, generator=torch.Generator().manual_seed(3)) + 99  # a large mean: rounding shows
    _, sums = kernels.transpose(x, column_sums=True)
    want = x.double().sum(0)
    assert float(((sums.double() - want) / want).abs().max()) < 1e-6


def test_onednn_linear_leaves_small_products_other_dtypes_autocast_and_a_refused_check_to_f_linear(monkeypatch):
    calls = []
    real = kernels._OneDNNLinear.apply
    monkeypatch.setattr(kernels._OneDNNLinear, "apply", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    kernels.linear(x, w)  # 96 multiply-adds: below ONEDNN_MIN_MACS
    assert calls == []
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 0)
    assert kernels.linear(x.double(), w.double()).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.linear(x, w).dtype == torch.bfloat16  # autocast's cast, as F.linear does
    monkeypatch.setattr(kernels, "_onednn_ok", False)
    torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w))
    assert calls == []
    monkeypatch.setattr(kernels, "_onednn_ok", kernels._onednn_check())
    kernels.linear(x, w)
    assert calls == ([1] if kernels._onednn_ok else [])  # the same call goes to oneDNN once all else allows


def _qkv_views(B, H, T, D, dtype=torch.float32, qkv=None):
    """q, k, v as the model makes them: [B, H, T, D] views into one [B, T, 3, H, D] projection output."""
    qkv = torch.randn(B, T, 3, H, D, dtype=dtype) if qkv is None else qkv
    return [qkv[:, :, i].transpose(1, 2) for i in range(3)]


@needs_kernel
@pytest.mark.parametrize("B,H,T,D", [(2, 3, 1, 16), (2, 3, 5, 32), (1, 2, 17, 64), (3, 4, 64, 32), (1, 2, 130, 48),
                                     (2, 2, 45, 80), (1, 1, 96, 128), (1, 1, 700, 16)])
def test_causal_attention_kernel_matches_sdpa_forward_and_backward(B, H, T, D):
    qkv = torch.randn(B, T, 3, H, D)
    grad = torch.randn(B, H, T, D)
    results = []
    for fn in (kernels.causal_attention, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)):
        leaf = qkv.clone().requires_grad_()
        views = _qkv_views(B, H, T, D, qkv=leaf)
        assert kernels.attention_applies(*views)
        y = fn(*views)
        y.backward(grad)
        results.append((y.detach(), leaf.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_causal_attention_falls_back_where_the_kernel_does_not_apply():
    for q, k, v in (_qkv_views(1, 2, 8, 24),  # head width not a multiple of 16
                    _qkv_views(1, 1, kernels.MAX_ATTENTION_TD // 16 + 1, 16),  # too long
                    _qkv_views(1, 1, 4, kernels.MAX_ATTENTION_D + 16),  # too wide
                    _qkv_views(1, 2, 8, 32, torch.bfloat16)):
        assert not kernels.attention_applies(q, k, v)
        torch.testing.assert_close(kernels.causal_attention(q, k, v),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True))
    q, k, v = _qkv_views(1, 2, 8, 32)
    assert not kernels.attention_applies(q, k[:, :, :4], v[:, :, :4])  # keys of another length (a cache)


@needs_kernel
def test_product_rows_do_not_depend_on_the_rows_beside_them(monkeypatch):
    """Every block shape of the product kernels computes a row's outputs with the same chain of
    multiply-adds, so rows agree to the bit alone and in any batch; the check notices a kernel where not."""
    assert kernels.rows_are_independent()
    lib = kernels.load_kernel()
    assert kernels._rows_match(lib)
    real = kernels._run

    def batch_dependent(fn, x, n, k, *tensors):
        y = real(fn, x, n, k, *tensors)
        return y if x.shape[0] == 1 else y * (1 + 2 ** -20)

    monkeypatch.setattr(kernels, "_run", batch_dependent)
    assert not kernels._rows_match(lib)
