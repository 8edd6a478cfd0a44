"""Properties of the Transformer itself (models/layers.py, models/decoder.py), on tiny CPU models."""
from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.models.decoder import DecoderLM
from lmforge.models.layers import (Attention, alibi_slopes, apply_rope, attention_mask, rope_cos_sin,
                                   rope_inv_freq, sinusoidal_encoding)
from lmforge.models.presets import PRESETS

POS_TYPES = ["learned", "sinusoidal", "rope", "alibi"]


def tiny(pos="rope", **kw) -> DecoderLM:
    base = dict(vocab_size=61, block_size=32, n_layers=2, n_heads=4, d_model=32, pos=pos, init_std=0.1)
    if pos == "rope":
        base.update(norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
    base.update(kw)
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(**base)).eval()


def ids(B, T, V=61, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


# --------------------------------------------------------------------------------------------------
# Causality


@pytest.mark.parametrize("pos", POS_TYPES)
def test_future_tokens_never_change_earlier_logits(pos):
    model = tiny(pos)
    x = ids(2, 12)
    j = 7
    y = x.clone()
    y[:, j] = (y[:, j] + 1) % 61
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :j], b[:, :j]) or torch.allclose(a[:, :j], b[:, :j], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, j:], b[:, j:], atol=1e-4)  # the change does reach later positions


# --------------------------------------------------------------------------------------------------
# Attention against the formula, from the layer's own weights


def _attn_layer(n_heads=4, n_kv_heads=None, d_model=32, seed=0) -> Attention:
    cfg = ModelConfig(vocab_size=10, n_heads=n_heads, n_kv_heads=n_kv_heads, d_model=d_model, pos="none")
    torch.manual_seed(seed)
    attn = Attention(cfg, 0).eval()
    with torch.no_grad():  # non-trivial biases too
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn


@pytest.mark.parametrize("causal", [True, False])
def test_single_head_attention_is_softmax_qkT_over_sqrt_dk_times_v(causal):
    attn = _attn_layer(n_heads=1, d_model=16)
    torch.manual_seed(1)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        out, _ = attn(x, is_causal=causal)
        W, b = attn.qkv.weight, attn.qkv.bias
        q = x @ W[:16].T + b[:16]
        k = x @ W[16:32].T + b[16:32]
        v = x @ W[32:].T + b[32:]
        scores = q @ k.transpose(1, 2) / math.sqrt(16)
        if causal:
            scores = scores.masked_fill(torch.ones(7, 7).triu(1).bool(), float("-inf"))
        ref = torch.softmax(scores, dim=-1) @ v
        ref = ref @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_multi_head_is_concat_of_heads_times_wo(n_kv_heads):
    H, C = 4, 32
    D = C // H
    attn = _attn_layer(n_heads=H, n_kv_heads=n_kv_heads, d_model=C)
    torch.manual_seed(2)
    x = torch.randn(2, 6, C)
    W, b = attn.qkv.weight, attn.qkv.bias
    causal = torch.ones(6, 6).triu(1).bool()
    with torch.no_grad():
        out, _ = attn(x)
        heads = []
        for h in range(H):
            g = h // (H // n_kv_heads)  # the K/V head serving query head h
            qs, ks, vs = slice(h * D, (h + 1) * D), slice((H + g) * D, (H + g + 1) * D), \
                slice((H + n_kv_heads + g) * D, (H + n_kv_heads + g + 1) * D)
            q, k, v = x @ W[qs].T + b[qs], x @ W[ks].T + b[ks], x @ W[vs].T + b[vs]
            a = torch.softmax((q @ k.transpose(1, 2) / math.sqrt(D)).masked_fill(causal, float("-inf")), -1)
            heads.append(a @ v)
        ref = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", POS_TYPES)
def test_explicit_attention_path_equals_sdpa_and_weights_are_causal_distributions(pos):
    model = tiny(pos, n_kv_heads=2)
    x = ids(2, 10)
    with torch.no_grad():
        fast = model(x)
        slow, weights = model(x, output_attentions=True)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-5)
    assert len(weights) == model.cfg.n_layers
    for w in weights:
        assert w.shape == (2, 4, 10, 10)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 10), atol=1e-6, rtol=0)
        assert torch.all(w.triu(1) == 0)
        assert torch.all(w[..., torch.ones(10, 10).tril().bool()] > 0)  # every allowed key gets some weight


def test_explicit_attention_path_with_padding_mask():
    model = tiny("alibi")
    x = ids(2, 8)
    key_mask = torch.ones(2, 8, dtype=torch.bool)
    key_mask[0, :3] = False
    pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        fast = model(x, positions_BT=pos, key_mask_BS=key_mask)
        slow, weights = model(x, positions_BT=pos, key_mask_BS=key_mask, output_attentions=True)
    torch.testing.assert_close(slow[0, 3:], fast[0, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow[1], fast[1], atol=1e-5, rtol=1e-5)
    assert torch.all(weights[0][0, :, 3:, :3] == 0)  # real queries never look at padding


# --------------------------------------------------------------------------------------------------
# KV cache, padding and packing


@pytest.mark.parametrize("pos", POS_TYPES)
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_kv_cache_decode_equals_full_forward(pos, n_kv_heads):
    model = tiny(pos, n_kv_heads=n_kv_heads)
    x = ids(2, 14)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 20)
        steps = [model(x[:, :5], cache=cache), model(x[:, 5:9], cache=cache)]  # prefill, a chunk, then 1 by 1
        for t in range(9, 14):
            steps.append(model(x[:, t:t + 1], cache=cache))
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_decode_with_qk_norm_and_last_only():
    model = tiny("rope", qk_norm=True, n_kv_heads=2)
    x = ids(1, 9)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(1)
        model(x[:, :4], cache=cache, last_only=True)
        for t in range(4, 9):
            last = model(x[:, t:t + 1], cache=cache, last_only=True)
            torch.testing.assert_close(last[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", POS_TYPES)
def test_left_padded_batch_equals_unpadded_rows(pos):
    model = tiny(pos, n_kv_heads=2)
    rows = [ids(1, 9, seed=3)[0], ids(1, 5, seed=4)[0], ids(1, 1, seed=5)[0]]
    L = 9
    x = torch.zeros(3, L, dtype=torch.long)
    key_mask = torch.zeros(3, L, dtype=torch.bool)
    for r, seq in enumerate(rows):
        x[r, L - len(seq):] = seq
        key_mask[r, L - len(seq):] = True
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(x, positions_BT=positions, key_mask_BS=key_mask)
        # and decoding two more tokens through the cache keeps matching
        cache = model.new_cache(3, L + 2)
        model(x, positions_BT=positions, cache=cache, key_mask_BS=key_mask)
        nxt = torch.tensor([[7], [8], [9]])
        km = torch.cat([key_mask, torch.ones(3, 1, dtype=torch.bool)], 1)
        step = model(nxt, positions_BT=positions[:, -1:] + 1, cache=cache, key_mask_BS=km)
        for r, seq in enumerate(rows):
            alone = model(seq[None])
            torch.testing.assert_close(batch[r, L - len(seq):], alone[0], atol=1e-5, rtol=1e-5)
            alone_next = model(torch.cat([seq, nxt[r]])[None])[0, -1]
            torch.testing.assert_close(step[r, 0], alone_next, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", POS_TYPES)
def test_packed_documents_equal_separate_sequences(pos):
    model = tiny(pos)
    a, b = ids(1, 6, seed=6)[0], ids(1, 9, seed=7)[0]
    packed = torch.cat([a, b])[None]
    doc_ids = torch.tensor([[0] * 6 + [1] * 9])
    positions = torch.cat([torch.arange(6), torch.arange(9)])[None]
    with torch.no_grad():
        out = model(packed, positions_BT=positions, doc_ids_BT=doc_ids)
        torch.testing.assert_close(out[0, :6], model(a[None])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[0, 6:], model(b[None])[0], atol=1e-5, rtol=1e-5)
        # without doc_ids the second document sees the first: different logits (the test can fail)
        mixed = model(packed, positions_BT=positions)
    assert not torch.allclose(mixed[0, 6:], out[0, 6:], atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Positional encodings


def test_rope_dot_product_depends_only_on_relative_offset_and_preserves_norm():
    cfg = ModelConfig(n_heads=1, d_model=16, pos="rope")
    inv = rope_inv_freq(cfg)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def rot(x, p):
        cos, sin = rope_cos_sin(torch.tensor([[p]]), inv)
        return apply_rope(x, cos, sin)

    dots = {(m, n): (rot(q, m) * rot(k, n)).sum().item() for m, n in [(3, 1), (10, 8), (52, 50), (5, 5), (40, 40)]}
    assert dots[(3, 1)] == pytest.approx(dots[(10, 8)], abs=1e-4)
    assert dots[(3, 1)] == pytest.approx(dots[(52, 50)], abs=1e-4)
    assert dots[(5, 5)] == pytest.approx(dots[(40, 40)], abs=1e-4)
    assert dots[(5, 5)] == pytest.approx((q * k).sum().item(), abs=1e-4)
    assert abs(dots[(3, 1)] - dots[(5, 5)]) > 1e-3  # the offset does matter
    for p in [0, 1, 17, 1000]:
        assert rot(q, p).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_rope_rotates_pairs_i_and_i_plus_half_by_position_times_frequency():
    """The "rotate half" layout (GPT-NeoX, HF Llama): pair (x_i, x_{i+D/2}) turns by p * theta^(-2i/D)."""
    D = 8
    cfg = ModelConfig(n_heads=1, d_model=D, pos="rope", rope_theta=100.0)
    torch.manual_seed(0)
    x = torch.randn(1, 1, 1, D)
    p = 3
    cos, sin = rope_cos_sin(torch.tensor([[p]]), rope_inv_freq(cfg))
    out = apply_rope(x, cos, sin)[0, 0, 0]
    x = x[0, 0, 0]
    for i in range(D // 2):
        theta = p * 100.0 ** (-2 * i / D)
        a, b = x[i].item(), x[i + D // 2].item()
        assert out[i].item() == pytest.approx(a * math.cos(theta) - b * math.sin(theta), abs=1e-5)
        assert out[i + D // 2].item() == pytest.approx(a * math.sin(theta) + b * math.cos(theta), abs=1e-5)


def test_sinusoidal_matches_formula_and_is_bounded():
    d = 16
    pos = torch.arange(0, 200)[None]
    pe = sinusoidal_encoding(pos, d)[0]
    assert pe.shape == (200, d)
    for p in [0, 1, 7, 199]:
        for i in range(d // 2):
            angle = p / (10000 ** (2 * i / d))
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    assert pe.abs().max() <= 1.0
    # the model adds exactly this to the token embeddings
    model = tiny("sinusoidal", n_layers=1)
    x = ids(1, 5)
    captured = {}
    model.drop.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(captured["x"][0], model.tok_emb(x)[0] + sinusoidal_encoding(torch.arange(5)[None], 32)[0])


def test_alibi_slopes_and_linear_bias():
    slopes = alibi_slopes(8)
    torch.testing.assert_close(slopes, torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # non-power-of-two: the first 4 of the 4-head sequence plus every other of the 8-head one (Press et al.)
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))
    T = 6
    bias = attention_mask(T, 0, alibi_H=slopes)[0]  # [H, T, S]
    for h in range(8):
        for i in range(T):
            for j in range(T):
                if j <= i:
                    assert bias[h, i, j].item() == pytest.approx(-slopes[h].item() * (i - j))
                else:
                    assert bias[h, i, j].item() == float("-inf")


# --------------------------------------------------------------------------------------------------
# Presets and dropout


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count(name):
    preset = PRESETS[name]
    from lmforge.models import build_model  # presets include seq2seq and encoder models

    with torch.device("meta"):
        model = build_model(preset.config)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == preset.params, f"{name}: module has {counted:,}, preset documents {preset.params:,}"
    assert model.num_params() == preset.params
    assert preset.config.num_params() == preset.params


def test_dropout_is_off_in_eval_and_on_in_train():
    model = tiny("learned", dropout=0.3)
    x = ids(2, 10)
    with torch.no_grad():
        model.eval()
        a, b = model(x), model(x)
        model.train()
        c, d = model(x), model(x)
    assert torch.equal(a, b)
    assert not torch.allclose(c, d)


def test_tied_embeddings_share_storage():
    model = tiny("learned", tie_embeddings=True)
    assert model.lm_head.weight is model.tok_emb.weight
