"""The chunked output head + cross-entropy (models/head_loss.py) against F.cross_entropy on the logits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.kernels import kernel_available
from lmforge.models import head_loss
from lmforge.models.decoder import DecoderLM
from lmforge.models.head_loss import chunk_rows, linear_cross_entropy
from lmforge.train.pretrain import next_token_loss


@pytest.fixture(autouse=True)
def chunked_at_any_size(monkeypatch):
    """These tests run the chunked path on small operands too (it normally starts at 512 Ki logits)."""
    monkeypatch.setattr(head_loss, "_MIN_LOGITS", 0)


def operands(N, C, V, seed=0, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g)
    W = torch.randn(V, C, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return h, W, y


def close(got, want):
    """Equal to fp32 rounding: a gradient entry sums up to thousands of terms in another order, so entries
    that nearly cancel get an absolute tolerance on the scale of the whole gradient."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def plain_and_fused(h, W, y, reduction="mean"):
    out = []
    for fn in (lambda a, b: F.cross_entropy(a @ b.t(), y, ignore_index=-100, reduction=reduction),
               lambda a, b: linear_cross_entropy(a, b, y, reduction)):
        a, b = h.clone().requires_grad_(), W.clone().requires_grad_()
        loss = fn(a, b)
        loss.backward()
        out.append((loss.detach(), a.grad, b.grad))
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("N,V", [(6, 11), (40, 1000), (2048, 1300)])
def test_loss_and_gradients_match_cross_entropy_on_the_logits(reduction, N, V):
    h, W, y = operands(N, 24, V, ignore_every=5)
    (l0, dh0, dW0), (l1, dh1, dW1) = plain_and_fused(h, W, y, reduction)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    close(dh1, dh0)
    close(dW1, dW0)


@pytest.mark.parametrize("kernel", [True, False])
def test_many_chunks_with_targets_on_every_chunk_edge(monkeypatch, kernel):
    if kernel and not kernel_available():
        pytest.skip("no C compiler for the CPU kernels")
    if not kernel:  # torch's ops for each chunk's softmax instead of csrc/softmax.c
        monkeypatch.setattr(head_loss, "softmax_chunk_", lambda *a: False)
    monkeypatch.setattr(head_loss, "_CHUNK_ELEMENTS", 16 * 20)  # 20 tokens -> 256-row chunks (the minimum)
    N, V = 20, 1000
    assert chunk_rows(N, V) == 256 and V % 256 != 0
    h, W, y = operands(N, 16, V, seed=3)
    y[:8] = torch.tensor([0, 255, 256, 511, 512, 767, 768, 999])
    y[8] = -100
    # Large logits: the running maximum moves from chunk to chunk, which the rescaling must undo exactly.
    W[300:310] *= 30
    (l0, dh0, dW0), (l1, dh1, dW1) = plain_and_fused(h, W, y)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    close(dh1, dh0)
    close(dW1, dW0)


def test_no_grad_matches_and_only_requested_gradients_are_computed():
    h, W, y = operands(30, 16, 700)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, W, y), F.cross_entropy(h @ W.t(), y))
    a = h.clone().requires_grad_()
    linear_cross_entropy(a, W, y).backward()  # a frozen head (LoRA): no weight gradient made
    assert W.grad is None
    torch.testing.assert_close(a.grad, torch.func.grad(lambda t: F.cross_entropy(t @ W.t(), y))(h),
                               rtol=1e-4, atol=1e-6)


def test_all_targets_ignored_gives_nan_like_cross_entropy_and_bad_targets_are_refused():
    h, W, y = operands(4, 8, 50)
    none = torch.full_like(y, -100)
    assert math.isnan(float(linear_cross_entropy(h, W, none))) and math.isnan(float(F.cross_entropy(h @ W.t(), none)))
    assert float(linear_cross_entropy(h, W, none, "sum")) == 0.0
    for bad in (50, -1):
        y2 = y.clone()
        y2[2] = bad
        with pytest.raises(IndexError, match=f"target {bad} is out of bounds for a vocabulary of 50"):
            linear_cross_entropy(h, W, y2)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, W, y, "none")
    with pytest.raises(ValueError, match="shapes do not match"):
        linear_cross_entropy(h, W[:, :4], y)


def test_autocast_the_switch_and_small_vocabularies_take_the_plain_path(monkeypatch):
    calls = []
    real = head_loss._LinearCrossEntropy.apply
    monkeypatch.setattr(head_loss._LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    h, W, y = operands(6, 8, 40)
    linear_cross_entropy(h, W, y)
    assert calls == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = linear_cross_entropy(h, W, y)
    monkeypatch.setattr(head_loss, "enabled", False)
    linear_cross_entropy(h, W, y)
    monkeypatch.setattr(head_loss, "enabled", True)
    monkeypatch.setattr(head_loss, "_MIN_LOGITS", 6 * 40 + 1)
    linear_cross_entropy(h, W, y)
    assert calls == [1]
    monkeypatch.setattr(head_loss, "_MIN_LOGITS", 6 * 40)
    linear_cross_entropy(h, W, y)
    assert calls == [1, 1]
    assert abs(float(low) - float(F.cross_entropy(h @ W.t(), y))) < 0.05  # bf16 logits, same loss


def tiny(tie: bool, bias: bool = False) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(vocab_size=300, block_size=16, n_layers=2, n_heads=2, d_model=32, pos="learned",
                                 tie_embeddings=tie, bias=bias, init_std=0.2))


@pytest.mark.parametrize("tie", [True, False])
def test_decoder_loss_and_every_parameter_gradient_match_the_logits_path(tie):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 300, (3, 16), generator=g)
    y = torch.randint(0, 300, (3, 16), generator=g)
    y[0, :5] = -100
    grads = []
    for fused in (False, True):
        model = tiny(tie)
        if fused:
            loss = next_token_loss(model, {"x": x, "y": y}, "sum")
        else:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-4)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=n)


def test_decoder_targets_refuse_decoding_options():
    model = tiny(True)
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="targets_BT"):
        model(x, targets_BT=x, last_only=True)


def test_the_chunked_path_still_runs_once_the_cpu_kernels_are_swapped_in(monkeypatch):
    from lmforge.kernels import use_cpu_kernels

    model = tiny(True)
    use_cpu_kernels(model)  # the training loop's swap: the head may become a KernelLinear, still plain
    calls = []
    real = head_loss._LinearCrossEntropy.apply
    monkeypatch.setattr(head_loss._LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randint(0, 300, (2, 16))
    loss = model(x, targets_BT=x)
    assert calls == [1]
    torch.testing.assert_close(loss, F.cross_entropy(model(x).flatten(0, 1), x.flatten()), rtol=1e-5, atol=1e-5)


def test_tied_lookup_gives_a_gradient_of_its_own_when_the_head_took_the_plain_path():
    W = torch.randn(40, 8, requires_grad=True)
    idx = torch.tensor([[1, 5, 5, 39]])
    slot = head_loss.TiedGradient()
    (head_loss.tied_lookup(idx, W, slot) * torch.arange(8.0)).sum().backward()
    W2 = W.detach().clone().requires_grad_()
    (F.embedding(idx, W2) * torch.arange(8.0)).sum().backward()
    assert torch.equal(W.grad, W2.grad) and slot.grad is None
