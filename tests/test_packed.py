"""oneDNN-packed fp32 linear layers for CPU inference (lmforge.packed): same outputs as nn.Linear, same
state_dict, and LM.load uses them on the CPU without changing what saves or exports."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig, UserError
from lmforge.models import build_model
from lmforge.packed import PackedLinear, is_packed, pack_linears, packing_available, unpack_linears
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN fp32 linear")


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


@pytest.mark.parametrize("tie", [True, False])
def test_packed_model_gives_the_same_logits_and_state(tie):
    model = _model(tie)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 97, (2, 20))
    with torch.inference_mode():
        want = model(x)
    assert pack_linears(model) == 2 * 4 + 1 and is_packed(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
    got = model.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    assert unpack_linears(model) == 9 and not is_packed(model)
    model.train()
    model(x).sum().backward()  # trains again once unpacked


def test_lm_load_packs_on_cpu_and_saves_and_exports_unchanged(tmp_path):
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
