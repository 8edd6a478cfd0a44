"""Parity of the Hugging Face converters against real ``transformers`` models (random weights, no hub).

For every family: HF -> lmforge logits match to 1e-4 in fp32, greedy decoding of 32 tokens is identical,
the lmforge -> HF export loads in AutoModelForCausalLM / AutoTokenizer with the same logits and ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from lmforge.config import GenerateConfig, ModelConfig, UserError  # noqa: E402
from lmforge.generate import generate_ids  # noqa: E402
from lmforge.interop import hf as H  # noqa: E402
from lmforge.models import build_model  # noqa: E402

TOL = 1e-4
VOCAB = 512
MIXED = "Hello world, 你好世界 🤖🎉 def f(x):\n\treturn x**2"
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """A small HF byte-level BPE tokenizer (as transformers saves it), trained on a few strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = ["Hello world, hello there. The quick brown fox jumps over the lazy dog.",
             "def f(x):\n\treturn x**2\n", "你好世界，今天天气很好。", "emoji 🤖🎉 are fun", MIXED] * 20
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    d = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(d)
    assert fast.vocab_size <= VOCAB
    return d


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, biases and norm gains included, so every tensor's mapping matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)


FAMILIES = {
    "gpt2-tied": ("GPT2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=96, bos_token_id=None,
                                eos_token_id=None)),
    "gpt2-untied-gelu": ("GPT2", dict(n_embd=64, n_layer=2, n_head=2, n_positions=80, n_inner=96,
                                       activation_function="gelu", tie_word_embeddings=False,
                                       layer_norm_epsilon=1e-6, bos_token_id=None, eos_token_id=None)),
    "llama-mqa-untied": ("Llama", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                        tie_word_embeddings=False, rope_theta=500.0)),
    "llama-gqa-llama3": ("Llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=True, rms_norm_eps=1e-5,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 32})),
    "llama-linear-biases": ("Llama", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                           rope_scaling={"rope_type": "linear", "factor": 2.0},
                                           attention_bias=True, mlp_bias=True)),
    "llama-headdim-mlpbias": ("Llama", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                             max_position_embeddings=128, attention_bias=False, mlp_bias=True)),
    "mistral-gqa": ("Mistral", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     sliding_window=4096)),
    "qwen2-bias-tied": ("Qwen2", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3-qknorm": ("Qwen3", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                    max_position_embeddings=128)),
}


def _hf_model(key: str, seed: int = 0):
    kind, kwargs = FAMILIES[key]
    config_cls = getattr(transformers, f"{kind}Config")
    model_cls = getattr(transformers, f"{kind}LMHeadModel" if kind == "GPT2" else f"{kind}ForCausalLM")
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=VOCAB, **kwargs))
    _randomize(model, seed)
    return model.eval()


def _prompts(seed: int, B: int = 2, T: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def _hf_greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                         attention_mask=torch.ones_like(prompt))
    return out[0, prompt.shape[1]:].tolist()


# --------------------------------------------------------------------------------------------------
# Parity, both directions


@pytest.mark.parametrize("key", list(FAMILIES))
def test_parity_roundtrip(key, tmp_path, hf_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = _hf_model(key)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    _copy_tokenizer(hf_tokenizer_dir, src)

    model, tok = H.load_hf(src)
    assert tok is not None
    ids = _prompts(1)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids)
    assert (ref - ours).abs().max().item() <= TOL

    # Greedy decoding through lmforge's KV-cache generation loop.
    prompt = ids[:1, :8]
    ours_gen = generate_ids(model, [prompt[0].tolist()], GenerateConfig(max_new_tokens=32, temperature=0.0))[0]
    assert ours_gen == _hf_greedy(hf, prompt, 32)

    # Tokenizer: same ids as transformers on mixed text; chat template kept.
    hf_tok = AutoTokenizer.from_pretrained(src)
    assert tok.encode(MIXED) == hf_tok(MIXED, add_special_tokens=False)["input_ids"]
    assert tok.chat_template == CHAT_TEMPLATE

    # Export back and load with plain transformers (no remote code).
    out = H.export_hf(model, tok, tmp_path / "export")
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    hf2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf2).__name__ == (type(hf).__name__ if not key.startswith("mistral") else "LlamaForCausalLM")
    with torch.no_grad():
        back = hf2(ids).logits
    assert (back - ours).abs().max().item() <= TOL
    assert _hf_greedy(hf2, prompt, 32) == ours_gen
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2(MIXED, add_special_tokens=False)["input_ids"] == tok.encode(MIXED)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, add_generation_prompt=True)


def test_config_mapping_fields():
    cfg = H.config_from_hf({
        "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 5e5, "tie_word_embeddings": True,
        "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}})
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.d_ff) == (100, 512, 3, 8, 2, 160)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == "llama3" and cfg.rope_factor == 32.0
    assert cfg.rope_original_max_positions == 8192 and cfg.tie_embeddings and cfg.norm_eps == 1e-5
    # transformers 5 form
    cfg5 = H.config_from_hf({
        "model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
        "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})
    assert cfg5.rope_scaling == "linear" and cfg5.rope_factor == 4.0 and cfg5.rope_theta == 1e6
    assert cfg5.use_qkv_bias and not cfg5.bias and cfg5.block_size == 32768
    # GPT-2 defaults left out by save_pretrained
    g = H.config_from_hf({"model_type": "gpt2", "vocab_size": 50, "n_embd": 32, "n_layer": 1, "n_head": 2})
    assert g.mlp == "gelu_tanh" and g.tie_embeddings and g.block_size == 1024 and g.ff == 128
    # Mistral: the context is capped at the sliding window (exact within it).
    m = H.config_from_hf({"model_type": "mistral", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "max_position_embeddings": 32768, "sliding_window": 4096})
    assert m.block_size == 4096


@pytest.mark.parametrize("bad, words", [
    ({"model_type": "bert"}, ["bert"]),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["yarn"]),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, ["dynamic"]),
    ({"model_type": "llama", "hidden_act": "gelu"}, ["hidden_act", "gelu"]),
    ({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True}, ["scale_attn_by_inverse_layer_idx"]),
    ({"model_type": "gpt2", "activation_function": "relu"}, ["activation_function", "relu"]),
    ({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}, ["LlamaForSequenceClassification"]),
])
def test_unsupported_configs_name_the_option(bad, words):
    base = {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "n_embd": 32, "n_layer": 1, "n_head": 2}
    with pytest.raises(UserError) as e:
        H.config_from_hf({**base, **bad})
    for w in words:
        assert w in str(e.value)


# --------------------------------------------------------------------------------------------------
# Input formats


@pytest.mark.parametrize("fmt", ["sharded", "bin"])
def test_sharded_and_bin_inputs(fmt, tmp_path, hf_tokenizer_dir):
    hf = _hf_model("llama-mqa-untied", seed=3)
    src = tmp_path / "hf"
    if fmt == "sharded":
        hf.save_pretrained(src, max_shard_size="100KB")
        assert (src / "model.safetensors.index.json").is_file() and not (src / "model.safetensors").exists()
    else:
        src.mkdir()
        hf.config.save_pretrained(src)
        torch.save(hf.state_dict(), src / "pytorch_model.bin")
    model, tok = H.load_hf(src)
    assert tok is None  # no tokenizer files in this directory
    ids = _prompts(5)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= TOL
    # Through the checkpoint loader (what `LM.load(HF_DIR)` uses).
    model2, _, meta = load_checkpoint(src)
    assert meta["source"] == "hf"
    with torch.no_grad():
        assert (model2(ids) - model(ids)).abs().max().item() == 0


def test_legacy_gpt2_checkpoint_keys(tmp_path):
    """GPT2Model-style keys (no "transformer." prefix) and the old causal-mask buffers load too."""
    hf = _hf_model("gpt2-tied", seed=4)
    state = {k.replace("transformer.", "", 1): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 96, 96).tril()
    cfg = H.config_from_hf(hf.config.to_dict())
    ours = H.state_from_hf(hf.config.to_dict(), state, consume=True)
    assert all(k.endswith(".attn.bias") for k in state)  # converted tensors were taken out of the dict
    model = H.build_from_state(cfg, ours)
    ids = _prompts(6)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= TOL


def test_unexpected_weights_are_refused(tmp_path):
    hf = _hf_model("qwen2-bias-tied")
    state = dict(hf.state_dict())
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    with pytest.raises(UserError, match="unexpected tensors"):
        H.state_from_hf(hf.config.to_dict(), state)


# --------------------------------------------------------------------------------------------------
# Import -> fine-tune -> save -> reload -> export


def test_import_finetune_save_export(tmp_path, hf_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    hf = _hf_model("llama-gqa-llama3", seed=7)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    _copy_tokenizer(hf_tokenizer_dir, src)
    (src / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.9}))

    ckpt = H.import_hf(src, tmp_path / "ckpt")
    model, tok, meta = load_checkpoint(ckpt)
    assert meta["generation"]["temperature"] == 0.7 and meta["generation"]["top_p"] == 0.9
    assert meta["imported_from"]["model_type"] == "llama"
    assert tok is not None and tok.chat_template == CHAT_TEMPLATE

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = _prompts(8, B=4, T=33)
    for _ in range(2):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_checkpoint(tmp_path / "tuned", model, tokenizer=tok, generation=meta["generation"])
    tuned, tok2, meta2 = load_checkpoint(tmp_path / "tuned")
    ids = _prompts(9)
    with torch.no_grad():
        a = model(ids)
        b = tuned(ids)
        assert (a - b).abs().max().item() == 0
        assert (a - hf(ids).logits).abs().max().item() > 1e-3  # it did train

    out = H.export_hf_path(tmp_path / "tuned", tmp_path / "exported")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["do_sample"] is True and gen["temperature"] == 0.7
    hf2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf2(ids).logits - b).abs().max().item() <= TOL


# --------------------------------------------------------------------------------------------------
# Export: representability


@pytest.mark.parametrize("overrides, words", [
    (dict(pos="sinusoidal"), ["sinusoidal"]),
    (dict(pos="alibi"), ["alibi"]),
    (dict(pos="none"), ["none"]),
    (dict(pos="learned", mlp="relu2"), ["relu2"]),
    (dict(pos="learned", norm="rmsnorm"), ["rmsnorm"]),
    (dict(pos="rope", norm="layernorm", mlp="swiglu"), ["layernorm"]),
    (dict(pos="rope", norm="rmsnorm", mlp="gelu"), ["gelu"]),
    (dict(pos="learned", scale_embeddings=True), ["scale_embeddings"]),
])
def test_export_refuses_unrepresentable_and_writes_nothing(overrides, words, tmp_path):
    cfg = ModelConfig(vocab_size=64, block_size=32, n_layers=1, n_heads=2, d_model=32, **overrides)
    model = build_model(cfg)
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        H.export_hf(model, None, out)
    for w in words:
        assert w in str(e.value)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cfg_kwargs, family", [
    (dict(pos="learned", norm="layernorm", mlp="gelu_tanh", bias=False, tie_embeddings=False), "GPT2LMHeadModel"),
    (dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=True, qkv_bias=False, n_kv_heads=1), "LlamaForCausalLM"),
    (dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True), "Qwen2ForCausalLM"),
    (dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True, head_dim=24), "Qwen3ForCausalLM"),
])
def test_native_lmforge_models_export(cfg_kwargs, family, tmp_path):
    """Models trained in lmforge (not imported) export to the family that represents them, exactly."""
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(vocab_size=96, block_size=48, n_layers=2, n_heads=4, d_model=64, **cfg_kwargs)
    torch.manual_seed(0)
    model = build_model(cfg)
    _randomize(model, 11)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.eval()
    out = H.export_hf(model, None, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == family
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= TOL


def test_export_refuses_nonzero_bias_without_slot(tmp_path):
    cfg = ModelConfig(vocab_size=64, block_size=32, n_layers=1, n_heads=2, d_model=32, pos="rope", norm="rmsnorm",
                      mlp="swiglu", bias=True, qk_norm=True)
    model = build_model(cfg)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.bias.fill_(0.5)
    with pytest.raises(UserError, match="mlp.fc2.bias"):
        H.export_hf(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bf16_load_keeps_rope_in_fp32_and_exports_bf16(tmp_path):
    hf = _hf_model("qwen2-bias-tied", seed=12)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = H.load_hf(tmp_path / "hf", dtype=torch.bfloat16)
    assert model.tok_emb.weight.dtype == torch.bfloat16 and model.rope_inv_freq.dtype == torch.float32
    out = H.export_hf(model, None, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_vocab_merges_only_tokenizer_dir(tmp_path, hf_tokenizer_dir):
    """Older GPT-2 directories ship vocab.json + merges.txt instead of tokenizer.json."""
    from transformers import AutoTokenizer

    hf = _hf_model("gpt2-tied", seed=13)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    data = json.loads((hf_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    (src / "vocab.json").write_text(json.dumps(data["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    _, tok = H.load_hf(src)
    ref = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    assert tok.encode("Hello world, hello there 🤖") == ref("Hello world, hello there 🤖", add_special_tokens=False)["input_ids"]


def test_explicit_nulls_and_class_defaults():
    # Mistral with sliding_window null: no window, context not capped; null kv heads means n_heads.
    m = H.config_from_hf({"model_type": "mistral", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": None,
                          "max_position_embeddings": 32768, "sliding_window": None, "head_dim": None})
    assert m.block_size == 32768 and m.kv_heads == 4 and m.hd == 8
    # Keys left out fall back to the transformers class defaults (Mistral: 8 KV heads, window 4096).
    m2 = H.config_from_hf({"model_type": "mistral", "vocab_size": 50, "hidden_size": 64, "intermediate_size": 64,
                           "num_hidden_layers": 1, "num_attention_heads": 8})
    assert m2.kv_heads == 8 and m2.block_size == 4096
    with pytest.raises(UserError, match="malformed"):
        H.config_from_hf({"model_type": "llama", "hidden_size": "wide"})
