"""Weight-only int8 quantization (lmforge.quantize): numerics, the module swap, and the LM / CLI wiring."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.config import UserError
from lmforge.models import build_model
from lmforge.models.presets import get_preset
from lmforge.quantize import QuantLinear, is_quantized, quantize_model


def _model(**kw):
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("char-tiny"), vocab_size=71, n_layers=2, d_model=64, n_heads=2, **kw)
    return build_model(cfg).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_matches_dequantized_weight(bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=bias)
    q = QuantLinear.from_linear(lin)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() <= 127
    # Per-channel rounding error is at most half a step of that channel's scale.
    assert ((q.dequantized_weight() - lin.weight).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 5, 96)
    exact = torch.nn.functional.linear(x, q.dequantized_weight(), q.bias)
    y = q(x)
    assert y.shape == (3, 5, 40) and y.dtype == torch.float32
    # The kernel rounds activations to bf16 (relative error 2^-9) and accumulates in fp32.
    torch.testing.assert_close(y, exact, rtol=2e-2, atol=2e-2 * exact.abs().max().item())
    q.use_kernel = False  # the fallback path computes exactly the dequantized product
    torch.testing.assert_close(q(x), exact, rtol=1e-5, atol=1e-5)


def test_quantize_model_swaps_every_linear_and_keeps_tied_embedding():
    model = _model()
    emb = model.tok_emb.weight.detach().clone()
    ref_logits = model(torch.randint(0, 71, (2, 16)))
    quantize_model(model, "int8")
    assert is_quantized(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, QuantLinear)
    assert torch.equal(model.tok_emb.weight, emb)  # the lookup table stays fp32
    torch.manual_seed(1)
    idx = torch.randint(0, 71, (2, 16))
    out = model(idx)
    assert out.shape == ref_logits.shape and torch.isfinite(out).all()


def test_int8_logits_close_to_fp32_and_decoding_works():
    from lmforge.config import GenerateConfig
    from lmforge.generate import generate_ids

    fp32, q8 = _model(), quantize_model(_model(), "int8")
    idx = torch.randint(0, 71, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = fp32(idx), q8(idx)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    out = generate_ids(q8, [[1, 2, 3], [4, 5]], GenerateConfig(max_new_tokens=8, temperature=0.0))
    assert [len(o) for o in out] == [8, 8]


def test_quantize_none_and_unknown_kind():
    model = _model()
    assert quantize_model(model, "none") is model and not is_quantized(model)
    with pytest.raises(UserError, match="quantize"):
        quantize_model(model, "int4")


def test_lm_load_quantize_and_cli(tmp_path, capsys):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.cli import main
    from lmforge.lm import LM
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train_from_iterator(["hello world, the quick brown fox"], kind="char")
    model = _model()
    model.cfg.vocab_size = max(model.cfg.vocab_size, tok.vocab_size)
    save_checkpoint(tmp_path / "ck", model, tokenizer=tok)
    lm = LM.load(tmp_path / "ck", quantize="int8")
    assert is_quantized(lm.model)
    assert isinstance(lm.generate("hello", max_new_tokens=5, temperature=0.0), str)
    with pytest.raises(UserError, match="quantized"):
        lm.save(tmp_path / "again")
    with pytest.raises(UserError, match="quantize"):
        LM.load(tmp_path / "ck", quantize="int3")
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "hel", "--max-new-tokens", "4",
                 "--temperature", "0", "--quantize", "int8", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("hel")
