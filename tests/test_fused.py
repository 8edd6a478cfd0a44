"""The compiled decoding step (lmforge.fused) against the model's own forward, which defines it."""
from __future__ import annotations


import pytest
import torch

from lmforge import kernels
from lmforge.config import GenerateConfig, LoraConfig, ModelConfig
from lmforge.fused import decode_step_for
from lmforge.generate import _Batch, generate_ids
from lmforge.lm import prepare_for_inference
from lmforge.models import build_model

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="lmforge's CPU kernels could not be built")

SMALL = dict(arch="decoder", n_layers=2, n_heads=4, d_model=64, vocab_size=211, block_size=64)
CONFIGS = {
    "gpt2": dict(),  # learned positions, LayerNorm, tanh GELU, biases, tied head
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_heads=2, tie_embeddings=False),
    "qk_norm": dict(pos="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", scale_embeddings=True, n_kv_heads=1),
    "erf_gelu": dict(pos="none", mlp="gelu", bias=False, head_dim=24),
    "relu_qkv_bias": dict(pos="rope", mlp="relu", bias=False, qkv_bias=True, rope_theta=500.0),
    "silu_scaled_rope": dict(pos="rope", mlp="silu", rope_scaling="linear", rope_factor=4.0),
}


def model_for(name: str, quantize: str = "none", seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**{**SMALL, **CONFIGS[name]})).eval()
    with torch.no_grad():  # away from the initialization's zeros and ones, so every part counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return prepare_for_inference(model, quantize)


@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_matches_the_forward_and_fills_the_cache_the_same_way(name, quantize):
    model = model_for(name, quantize)
    step = decode_step_for(model)
    assert step is not None
    B = 3
    with torch.inference_mode():
        ours, ref = model.new_cache(B, 24), model.new_cache(B, 24)
        prompt = torch.randint(0, 211, (B, 7))
        model(prompt, cache=ours)
        model(prompt, cache=ref)
        tok_B = torch.randint(0, 211, (B,))
        for _ in range(6):
            want = model(tok_B[:, None], cache=ref, last_only=True)[:, -1]
            got = step(tok_B, ours)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            assert ours.length == ref.length
            tok_B = want.argmax(-1)
        for a, b in zip(ours.k + ours.v, ref.k + ref.v):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_left_padded_batch_with_dropped_rows_matches_the_forward(quantize):
    """Per-row positions and padding starts, and the cache compaction generate does when rows finish."""
    model = model_for("llama", quantize, seed=1)
    fused = decode_step_for(model)
    contexts = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 2], [11], [3, 3, 3, 3]]
    with torch.inference_mode():
        ours = _Batch(model, contexts, [0, 1, 2, 3], 20, "cpu", 0, fused)
        ref = _Batch(model, contexts, [0, 1, 2, 3], 20, "cpu", 0, None)
        tok_B = ref.logits_BV.argmax(-1)
        for i in range(8):
            if i == 3:  # rows 0 and 2 finish
                index = ours.keep([1, 3])
                ref.keep([1, 3])
                tok_B = tok_B.index_select(0, index)
            want, got = ref.step(model, tok_B), ours.step(model, tok_B)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            tok_B = want.argmax(-1)


def test_generate_gives_the_forwards_tokens(monkeypatch):
    model = model_for("gpt2", seed=2)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    cfg = GenerateConfig(max_new_tokens=40, temperature=0.0)
    calls = []
    real = type(decode_step_for(model)).__call__
    monkeypatch.setattr(type(decode_step_for(model)), "__call__",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    ours = generate_ids(model, prompts, cfg, eos_id=17)
    assert len(calls) >= 10  # the compiled step ran
    monkeypatch.setenv("LMFORGE_FUSED_DECODE", "0")
    n = len(calls)
    assert generate_ids(model, prompts, cfg, eos_id=17) == ours
    assert len(calls) == n  # and the switch turns it off


def test_sampling_and_the_sliding_window_take_it_too(monkeypatch):
    model = model_for("erf_gelu", seed=3)
    assert decode_step_for(model) is not None
    cfg = GenerateConfig(max_new_tokens=150, temperature=0.9, top_k=20, seed=4)
    ours = generate_ids(model, [[1, 2, 3]], cfg)  # 150 > block_size 64: the window slides twice
    monkeypatch.setenv("LMFORGE_FUSED_DECODE", "0")
    ref = generate_ids(model, [[1, 2, 3]], cfg)
    assert len(ours[0]) == 150
    same = sum(a == b for a, b in zip(ours[0], ref[0]))
    assert same >= 140, same  # sampled: logits 1e-6 apart may rarely pick another token near a tie


def test_models_it_does_not_know_keep_their_forward(monkeypatch):
    assert decode_step_for(model_for("gpt2").train()) is None  # training mode
    plain = build_model(ModelConfig(**SMALL)).eval()
    assert decode_step_for(plain) is None  # pack=False: PyTorch's own path
    for other in (dict(pos="alibi"), dict(pos="sinusoidal")):
        model = prepare_for_inference(build_model(ModelConfig(**{**SMALL, **other})))
        assert decode_step_for(model) is None
    from lmforge.finetune.lora import apply_lora

    lora = build_model(ModelConfig(**SMALL))
    apply_lora(lora, LoraConfig(rank=2))
    assert decode_step_for(prepare_for_inference(lora)) is None
    assert decode_step_for(model_for("gpt2").to(torch.float64)) is None
    monkeypatch.setattr("lmforge.fused.load_kernel", lambda: None)
    assert decode_step_for(model_for("gpt2")) is None


def test_full_cache_and_out_of_range_inputs_are_refused():
    model = model_for("gpt2")
    step = decode_step_for(model)
    with torch.inference_mode():
        cache = model.new_cache(1, 4)
        model(torch.tensor([[1, 2, 3, 4]]), cache=cache)
        assert not step.applies(1, cache)
        with pytest.raises(ValueError, match="does not take"):
            step(torch.tensor([5]), cache)
        cache = model.new_cache(1, 8)
        with pytest.raises(ValueError, match="token id"):
            step(torch.tensor([211]), cache)
        with pytest.raises(ValueError, match="block_size"):
            step(torch.tensor([1]), cache, positions_B=torch.tensor([64]))
        assert cache.length == 0  # nothing was written
        assert not step.applies(2, cache)  # a cache for one row


def test_rows_with_their_own_lengths_match_the_forward_and_refuse_bad_slots():
    """``rows`` (the server's slot cache): each row writes at its own slot and sees only its own slots; it
    gives what the forward gives for that row alone, and bad slots, starts and buffers write nothing."""
    model = model_for("llama")
    step = decode_step_for(model)
    lens, cap = [5, 2, 9], 16
    shape = (3, model.cfg.kv_heads, cap, model.cfg.hd)
    k = [torch.zeros(shape) for _ in range(model.cfg.n_layers)]
    v = [torch.zeros(shape) for _ in range(model.cfg.n_layers)]
    with torch.inference_mode():
        prompts = [torch.randint(0, 211, (1, n)) for n in lens]
        singles = []
        for r, p in enumerate(prompts):
            c = model.new_cache(1, cap)
            model(p, cache=c)
            for layer in range(model.cfg.n_layers):
                k[layer][r, :, : lens[r]] = c.k[layer][0, :, : lens[r]]
                v[layer][r, :, : lens[r]] = c.v[layer][0, :, : lens[r]]
            singles.append(c)
        tok = torch.tensor([3, 14, 15])
        end = torch.tensor(lens)
        for _ in range(3):
            got = step.rows(tok, k, v, end_B=end)
            want = torch.cat([model(tok[r].view(1, 1), cache=singles[r], last_only=True)[:, -1] for r in range(3)])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            tok, end = want.argmax(-1), end + 1
        before = [t.clone() for t in k + v]
        for kw, match in ((dict(end_B=torch.tensor([1, 2, cap])), "cache slot"),
                          (dict(end_B=torch.tensor([1, 2, 3]), start_B=torch.tensor([0, 3, 0])), "first visible"),
                          (dict(end_B=torch.tensor([1, 2])), "one entry per row")):
            with pytest.raises(ValueError, match=match):
                step.rows(tok, k, v, **kw)
        with pytest.raises(ValueError, match="layers"):
            step.rows(tok, k[:1], v[:1], end_B=end)
        with pytest.raises(ValueError, match="contiguous fp32"):
            step.rows(tok, [t[:, :, :8] for t in k], v, end_B=end)
        with pytest.raises(ValueError, match="contiguous fp32"):
            step.rows(tok, [t[0] for t in k], v, end_B=end)
        assert all(torch.equal(a, b) for a, b in zip(before, k + v))
