"""GGUF interop: load llama.cpp model files (Llama architecture, and Qwen2/Qwen3) into lmforge.

A GGUF file holds metadata (``llama.block_count``, ``tokenizer.ggml.tokens``, ...) and tensors, some
quantized in blocks (Q8_0, Q4_0, Q4_1, K-quants). We read both with the PyPI ``gguf`` package, dequantize
every tensor to float32 with ``gguf.quants.dequantize`` and map the names onto models/decoder.py:

    token_embd            tok_emb          output_norm    norm_f        output   lm_head (absent: tied)
    blk.N.attn_norm       blocks.N.norm1   blk.N.ffn_norm blocks.N.norm2
    blk.N.attn_q/_k/_v    blocks.N.attn.qkv   (stacked [q; k; v])
    blk.N.attn_output     blocks.N.attn.proj
    blk.N.ffn_gate/_up    blocks.N.mlp.fc1    (stacked [gate; up])
    blk.N.ffn_down        blocks.N.mlp.fc2

RoPE layout. llama.cpp's "llama" architecture rotates adjacent pairs (x[2i], x[2i+1]) (the layout of
Meta's original code), while lmforge and HF rotate (x[i], x[i + D/2]). llama.cpp's converter therefore
permutes the rows of each head of attn_q and attn_k from the HF order into the interleaved order; we undo
that permutation (per head: rows [0, 2, 4, ..., 1, 3, 5, ...] of the file are rows [0..D/2, D/2..D] here).
Qwen2/Qwen3 files use the "rotate half" (NeoX) layout already and are not permuted.

Llama 3.1-style RoPE scaling is stored as a ``rope_freqs`` tensor of per-frequency divisors; we recognise
it when it equals the Llama-3 formula (factor = its largest value, low/high frequency factors 1 and 4,
original context 8192) and refuse it otherwise.

The tokenizer is rebuilt from ``tokenizer.ggml.*``: a byte-level BPE (``tokenizer.ggml.model == "gpt2"``)
with the file's merges, the ByteLevel pre-tokenizer and decoder (the split regex of the vocabulary's
``tokenizer.ggml.pre`` family when known), control tokens as special tokens and the chat template from
``tokenizer.chat_template`` -- the same tokenizer transformers builds from the file, so ids are identical.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, ModelConfig, UserError

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")

# Pre-tokenizer split patterns of the vocabularies llama.cpp names in tokenizer.ggml.pre. They are part
# of each tokenizer's definition (the regex its merges were learned with); others use GPT-2's pattern.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


# ==================================================================================================
# Reading


class GGUFFile:
    """Metadata (plain Python values) and tensors of a GGUF file."""

    def __init__(self, path: str | Path):
        try:
            from gguf import GGUFReader
        except ImportError:
            raise UserError("reading GGUF files needs the gguf package: pip install 'lmforge[gguf]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"GGUF file not found: {self.path}")
        try:
            self.reader = GGUFReader(str(self.path))
        except Exception as e:  # noqa: BLE001 - gguf raises ValueError/struct errors on bad files
            raise UserError(f"{self.path} is not a readable GGUF file ({str(e).splitlines()[0] if str(e) else e})") \
                from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def keys(self):
        return self.reader.fields.keys()

    def tensor(self, name: str):
        """Dequantized float32 torch tensor in the logical [rows, cols] layout."""
        import numpy as np
        import torch
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.tensors[name]
        qtype = GGMLQuantizationType(int(t.tensor_type))
        try:
            data = dequantize(t.data, qtype)
        except NotImplementedError:
            raise UserError(f"{self.path}: tensor {name} uses quantization type {qtype.name}, which the gguf "
                            f"package cannot dequantize") from None
        shape = tuple(int(x) for x in reversed([int(s) for s in t.shape]))  # GGUF lists dims fastest-first
        arr = np.ascontiguousarray(data, dtype=np.float32).reshape(shape)
        return torch.from_numpy(arr.copy() if not arr.flags.writeable else arr)


# ==================================================================================================
# Config


def _uniform(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UserError(f"unsupported GGUF model: {what} differs between layers ({sorted(set(value))})")
        value = value[0]
    return int(value)


def _rope_from_freqs(f: GGUFFile, base: dict) -> dict:
    """Llama-3 scaling parameters that reproduce the file's rope_freqs divisors, or UserError."""
    import torch

    from ..models.layers import rope_inv_freq

    divisors = f.tensor("rope_freqs.weight").double().flatten()
    factor = float(divisors.max())
    if factor == 1.0 and bool((divisors == 1).all()):
        return {}
    plain = ModelConfig(**{**base, "rope_scaling": "none"})
    for orig in (8192, 4096, 2048, 16384, 32768, 131072):
        guess = dict(rope_scaling="llama3", rope_factor=factor, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                     rope_original_max_positions=orig)
        scaled = ModelConfig(**{**base, **guess})
        ratio = rope_inv_freq(plain).double() / rope_inv_freq(scaled).double()
        if ratio.shape == divisors.shape and torch.allclose(ratio, divisors, rtol=1e-3, atol=1e-4):
            return guess
    raise UserError(f"unsupported GGUF model: rope_freqs (per-frequency RoPE scaling) that is not Llama-3 "
                    f"scaling with factor {factor}")


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    arch = f.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UserError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
    k = lambda name, default=None: f.get(f"{arch}.{name}", default)  # noqa: E731
    names = set(f.tensors)
    if any("_exps" in n or "ffn_gate_inp" in n for n in names):
        raise UserError(f"unsupported GGUF model: mixture-of-experts {arch} (expert tensors present)")
    if "token_embd.weight" not in names:
        raise UserError(f"{f.path}: GGUF file has no token_embd.weight tensor")
    vocab = int(f.tensors["token_embd.weight"].shape[-1])
    d = int(k("embedding_length"))
    heads = _uniform(k("attention.head_count"), "attention.head_count")
    kv = _uniform(k("attention.head_count_kv", heads), "attention.head_count_kv")
    head_dim = int(k("attention.key_length", d // heads))
    if int(k("attention.value_length", head_dim)) != head_dim:
        raise UserError("unsupported GGUF model: attention.value_length differs from attention.key_length")
    rot = k("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise UserError(f"unsupported GGUF model: partial rotary embedding (rope.dimension_count={rot}, "
                        f"head dim {head_dim})")
    block = int(k("context_length", 2048))
    base = dict(
        vocab_size=vocab, block_size=block, n_layers=int(k("block_count")), n_heads=heads,
        n_kv_heads=kv if kv != heads else None, d_model=d, head_dim=head_dim if head_dim * heads != d else None,
        d_ff=_uniform(k("feed_forward_length"), "feed_forward_length"), mlp="swiglu", norm="rmsnorm",
        norm_eps=float(k("attention.layer_norm_rms_epsilon", 1e-5)), pos="rope",
        rope_theta=float(k("rope.freq_base", 10000.0)),
        qk_norm="blk.0.attn_q_norm.weight" in names,
        tie_embeddings="output.weight" not in names,
    )
    # Biases: which projections carry them in the file (Qwen2: q/k/v only).
    qkv_b = "blk.0.attn_q.bias" in names
    bias = "blk.0.attn_output.bias" in names or "blk.0.ffn_down.bias" in names
    base.update(bias=bias, qkv_bias=qkv_b if qkv_b != bias else None)
    scaling = k("rope.scaling.type")
    if scaling in (None, "none"):
        pass
    elif scaling == "linear":
        base.update(rope_scaling="linear", rope_factor=float(k("rope.scaling.factor", 1.0)))
    else:
        raise UserError(f"unsupported GGUF option rope.scaling.type={scaling!r} (supported: none, linear)")
    if "rope_freqs.weight" in names:
        if base.get("rope_scaling", "none") != "none":
            raise UserError("unsupported GGUF model: rope_freqs together with rope.scaling.type")
        base.update(_rope_from_freqs(f, base))
    try:
        return ModelConfig(**base).validate()
    except ConfigError as e:
        raise UserError(f"GGUF model cannot be represented: {e}") from None


# ==================================================================================================
# Weights


def _unpermute(w, n_head: int):
    """Undo llama.cpp's per-head row interleaving of attn_q / attn_k (see the module doc)."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def state_from_gguf(f: GGUFFile, cfg: ModelConfig, dtype=None) -> dict:
    import torch

    arch = f.get("general.architecture")
    permuted = arch == "llama"  # llama.cpp's converter permutes q/k only for the Llama family
    names = set(f.tensors)
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(name: str, optional: bool = False):
        if name not in names:
            if optional:
                return None
            raise UserError(f"{f.path}: GGUF tensor {name} is missing")
        used.add(name)
        return f.tensor(name)

    def put(name: str, t) -> None:
        out[name] = t.to(dtype) if dtype is not None else t

    put("tok_emb.weight", take("token_embd.weight"))
    put("norm_f.weight", take("output_norm.weight"))
    if not cfg.tie_embeddings:
        put("lm_head.weight", take("output.weight"))
    H, K, D, F, C = cfg.n_heads, cfg.kv_heads, cfg.hd, cfg.ff, cfg.d_model
    for i in range(cfg.n_layers):
        p, q = f"blk.{i}.", f"blocks.{i}."
        put(q + "norm1.weight", take(p + "attn_norm.weight"))
        put(q + "norm2.weight", take(p + "ffn_norm.weight"))
        wq, wk, wv = take(p + "attn_q.weight"), take(p + "attn_k.weight"), take(p + "attn_v.weight")
        if permuted:
            wq, wk = _unpermute(wq, H), _unpermute(wk, K)
        put(q + "attn.qkv.weight", torch.cat([wq, wk, wv], dim=0))
        if cfg.use_qkv_bias:
            bq, bk, bv = (take(p + f"attn_{n}.bias", optional=True) for n in "qkv")
            bq = torch.zeros(H * D) if bq is None else (_unpermute(bq, H) if permuted else bq)
            bk = torch.zeros(K * D) if bk is None else (_unpermute(bk, K) if permuted else bk)
            bv = torch.zeros(K * D) if bv is None else bv
            put(q + "attn.qkv.bias", torch.cat([bq, bk, bv]))
        put(q + "attn.proj.weight", take(p + "attn_output.weight"))
        if cfg.bias:
            b = take(p + "attn_output.bias", optional=True)
            put(q + "attn.proj.bias", torch.zeros(C) if b is None else b)
        if cfg.qk_norm:
            put(q + "attn.q_norm.weight", take(p + "attn_q_norm.weight"))
            put(q + "attn.k_norm.weight", take(p + "attn_k_norm.weight"))
        put(q + "mlp.fc1.weight", torch.cat([take(p + "ffn_gate.weight"), take(p + "ffn_up.weight")], dim=0))
        put(q + "mlp.fc2.weight", take(p + "ffn_down.weight"))
        if cfg.bias:
            bg, bu, bd = (take(p + f"ffn_{n}.bias", optional=True) for n in ("gate", "up", "down"))
            put(q + "mlp.fc1.bias", torch.cat([torch.zeros(F) if bg is None else bg,
                                               torch.zeros(F) if bu is None else bu]))
            put(q + "mlp.fc2.bias", torch.zeros(C) if bd is None else bd)
    used.add("rope_freqs.weight")  # folded into the config
    if cfg.tie_embeddings:
        used.add("output.weight")
    left = sorted(names - used)
    if left:
        raise UserError(f"unsupported GGUF {arch} variant: unexpected tensors {left[:3]}"
                        f"{'...' if len(left) > 3 else ''}")
    return out


# ==================================================================================================
# Tokenizer


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (Radford et al. 2019): printable Latin-1 bytes
    map to themselves, the others to code points from 256 up, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_from_gguf(f: GGUFFile):
    """The lmforge Tokenizer described by the file's ``tokenizer.*`` metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    from ..tokenizer import Tokenizer

    kind = f.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"unsupported GGUF tokenizer model {kind!r}: lmforge rebuilds byte-level BPE ('gpt2') "
                        f"tokenizers only")
    tokens: list[str] = list(f.get("tokenizer.ggml.tokens") or [])
    merges_raw = f.get("tokenizer.ggml.merges")
    if not tokens or merges_raw is None:
        raise UserError(f"{f.path}: GGUF tokenizer has no tokens or no merges")
    types = list(f.get("tokenizer.ggml.token_type") or [])
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # Byte-level vocabularies spell every token in the byte alphabet; a token written in plain text
    # (some converters do this for added tokens) is respelled through its UTF-8 bytes.
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    split = _PRE_SPLITS.get(f.get("tokenizer.ggml.pre"))
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()

    def token(key: str) -> Optional[str]:
        i = f.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    named = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
             "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    # Control tokens (<|endoftext|>, <|im_start|>, ...) stay whole and are special; user-defined ones stay
    # whole but are ordinary text. A "control" token outside the byte alphabet is a converter mislabel.
    control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    specials = list(dict.fromkeys(control + [t for t in named.values() if t is not None and t in vocab]))
    if specials:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    config = {
        **named,
        "additional_special_tokens": [t for t in control if t not in named.values()],
        "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(f.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(f.get(f"{f.get('general.architecture')}.context_length", 0) or 0) or None,
    }
    config = {k: v for k, v in config.items() if v is not None}
    return Tokenizer(tok, config, chat_template=f.get("tokenizer.chat_template"))


# ==================================================================================================
# Entry points


def load_gguf(file: str | Path, device: str = "cpu", dtype=None):
    """(DecoderLM, Tokenizer) from a GGUF file; weights are dequantized to float32 (or ``dtype``)."""
    from .hf import build_from_state

    f = GGUFFile(file)
    cfg = config_from_gguf(f)
    tokenizer = tokenizer_from_gguf(f)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{f.path}: tokenizer has {tokenizer.vocab_size} tokens but the model {cfg.vocab_size} "
                        f"embedding rows")
    state = state_from_gguf(f, cfg, dtype=dtype)
    model = build_from_state(cfg, state, device=device, dtype=dtype, where=f"GGUF file {f.path}")
    return model, tokenizer


def import_gguf(file: str | Path, out: str | Path) -> Path:
    """Convert a GGUF file into an lmforge checkpoint directory ``out``."""
    from ..checkpoint import save_checkpoint

    model, tokenizer = load_gguf(file)
    f = Path(file)
    extra = {"imported_from": {"format": "gguf", "path": str(f.resolve())}}
    return save_checkpoint(out, model, tokenizer=tokenizer, extra=extra)
