"""Hugging Face interop for Marian (MarianMTModel, the Opus-MT translation models) <-> lmforge's
encoder-decoder (models/seq2seq.py), without ``transformers``.

Marian is the classic Transformer: post-norm blocks, sinusoidal positions starting at 0 in the
concatenated layout (all sines, then all cosines), embeddings optionally scaled by sqrt(d_model), LayerNorm
eps 1e-5, biases everywhere, and a ``final_logits_bias`` added to the output logits. The conversion:

    model.shared (or encoder/decoder.embed_tokens)       -> tok_emb (+ src_emb with separate vocabularies)
    encoder.layers.N.self_attn.{q,k,v}_proj, out_proj     -> encoder.N.attn.qkv (rows [q; k; v]), attn.proj
    encoder.layers.N.self_attn_layer_norm, final_layer_norm -> encoder.N.norm1, norm2;  fc1, fc2 -> mlp.fc1, fc2
    decoder.layers.N.self_attn.*, self_attn_layer_norm    -> decoder.N.attn.*, norm1
    decoder.layers.N.encoder_attn.q_proj / {k,v}_proj / out_proj -> decoder.N.cross_attn.q / kv (rows [k; v]) / proj
    decoder.layers.N.encoder_attn_layer_norm, final_layer_norm   -> decoder.N.norm2, norm3
    lm_head.weight (tied unless tie_word_embeddings is false)    -> lm_head.weight;  final_logits_bias -> lm_head.bias

Export accepts an lmforge model with the interleaved sinusoidal layout too: permuting the channels of the
residual stream (every weight that reads or writes it, every norm gain and bias, the embeddings) is an exact
symmetry of a post-norm Transformer, and the permutation that turns interleaved sin/cos into concatenated
sin/cos makes the model's positions Marian's.

Marian's tokenizers are sentencepiece models (source.spm, target.spm); lmforge converts the weights only.
An imported Marian checkpoint is complete for logits and generation over token ids; for text in and out,
fine-tune it with an lmforge tokenizer or use the HF tokenizer alongside.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from ..config import ConfigError, ModelConfig, UserError

_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                "swish": "silu", "silu": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "swish"}


def marian_config_from_hf(hf_cfg: dict) -> ModelConfig:
    g = hf_cfg.get
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if g(a, 8) != g(b, 8 if "heads" in a else 2048):
            raise UserError(f"unsupported Marian config: {a}={g(a)} differs from {b}={g(b)} (lmforge uses one value)")
    act = g("activation_function", "gelu")
    if act not in _ACT_FROM_HF:
        raise UserError(f"unsupported Marian activation_function {act!r} (supported: {', '.join(_ACT_FROM_HF)})")
    share = bool(g("share_encoder_decoder_embeddings", True))
    vocab = int(g("vocab_size", 58101))
    try:
        return ModelConfig(
            arch="seq2seq", vocab_size=vocab if share else int(g("decoder_vocab_size") or vocab),
            src_vocab_size=None if share else vocab, block_size=int(g("max_position_embeddings", 1024)),
            n_layers=int(g("encoder_layers", 12)), n_decoder_layers=int(g("decoder_layers", 12)),
            n_heads=int(g("encoder_attention_heads", 16)), d_model=int(g("d_model", 1024)),
            d_ff=int(g("encoder_ffn_dim", 4096)), mlp=_ACT_FROM_HF[act], norm="layernorm", norm_eps=1e-5,
            pos="sinusoidal", sinusoidal_layout="concat", bias=True, tie_embeddings=bool(g("tie_word_embeddings", True)),
            scale_embeddings=bool(g("scale_embedding", False)), norm_position="post", head_bias=True,
            dropout=float(g("dropout", 0.1) or 0.0), init_std=float(g("init_std", 0.02)),
            pad_id=g("pad_token_id"), decoder_start_id=g("decoder_start_token_id", g("pad_token_id"))).validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise UserError(f"Marian config cannot be represented: {e}") from None


def marian_state_from_hf(cfg: ModelConfig, hf_cfg: dict, hf_state: Mapping) -> dict:
    import torch

    used: set[str] = set()

    def take(name: str):
        if name not in hf_state:
            raise UserError(f"Marian weights: tensor {name!r} is missing")
        used.add(name)
        return hf_state[name]

    def first(*names: str):
        for n in names:
            if n in hf_state:
                return take(n)
        raise UserError(f"Marian weights: none of {list(names)} is present")

    out = {}

    def linear(dst: str, src: str) -> None:
        out[dst + ".weight"], out[dst + ".bias"] = take(src + ".weight"), take(src + ".bias")

    def cat(dst: str, srcs: list[str]) -> None:
        out[dst + ".weight"] = torch.cat([take(s + ".weight") for s in srcs])
        out[dst + ".bias"] = torch.cat([take(s + ".bias") for s in srcs])

    share = cfg.src_vocab_size is None
    if share:
        out["tok_emb.weight"] = first("model.shared.weight", "model.decoder.embed_tokens.weight",
                                      "model.encoder.embed_tokens.weight")
    else:
        out["src_emb.weight"] = take("model.encoder.embed_tokens.weight")
        out["tok_emb.weight"] = take("model.decoder.embed_tokens.weight")
    for i in range(cfg.enc_layers):
        h, m = f"model.encoder.layers.{i}.", f"encoder.{i}."
        cat(m + "attn.qkv", [h + f"self_attn.{n}_proj" for n in "qkv"])
        linear(m + "attn.proj", h + "self_attn.out_proj")
        linear(m + "norm1", h + "self_attn_layer_norm")
        linear(m + "mlp.fc1", h + "fc1")
        linear(m + "mlp.fc2", h + "fc2")
        linear(m + "norm2", h + "final_layer_norm")
    for i in range(cfg.dec_layers):
        h, m = f"model.decoder.layers.{i}.", f"decoder.{i}."
        cat(m + "attn.qkv", [h + f"self_attn.{n}_proj" for n in "qkv"])
        linear(m + "attn.proj", h + "self_attn.out_proj")
        linear(m + "norm1", h + "self_attn_layer_norm")
        linear(m + "cross_attn.q", h + "encoder_attn.q_proj")
        cat(m + "cross_attn.kv", [h + "encoder_attn.k_proj", h + "encoder_attn.v_proj"])
        linear(m + "cross_attn.proj", h + "encoder_attn.out_proj")
        linear(m + "norm2", h + "encoder_attn_layer_norm")
        linear(m + "mlp.fc1", h + "fc1")
        linear(m + "mlp.fc2", h + "fc2")
        linear(m + "norm3", h + "final_layer_norm")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    bias = hf_state["final_logits_bias"] if "final_logits_bias" in hf_state else torch.zeros(1, cfg.vocab_size)
    used.add("final_logits_bias")
    out["lm_head.bias"] = bias.reshape(-1)
    # Copies of tied embeddings and the sinusoid tables some checkpoints store are not weights lmforge needs.
    ignorable = ("embed_positions.weight", "embed_tokens.weight", "model.shared.weight", "lm_head.weight")
    left = [k for k in hf_state.keys() if k not in used and not k.endswith(ignorable)]
    if left:
        raise UserError(f"Marian weights: {len(left)} tensors lmforge does not know how to convert, e.g. {left[0]!r}")
    return {k: v.float() for k, v in out.items()}


def load_hf_marian(directory, device: str = "cpu", dtype=None):
    """(Seq2SeqModel, Tokenizer | None) from a MarianMTModel directory."""
    from .hf import _LazyWeights, _load_tokenizer, read_hf_config
    from .hf_bert import build_encdec

    d = Path(directory)
    hf_cfg = read_hf_config(d)
    cfg = marian_config_from_hf(hf_cfg)
    state = marian_state_from_hf(cfg, hf_cfg, _LazyWeights(d))
    model = build_encdec(cfg, state, device=device, dtype=dtype, where=f"Hugging Face model {d}")
    return model, _load_tokenizer(d)


# ==================================================================================================
# lmforge -> Marian


def _channel_order(cfg: ModelConfig):
    """The residual-stream permutation that turns the interleaved sinusoid layout into the concatenated one
    (None when the model already uses the concatenated layout or no sinusoids)."""
    import torch

    if cfg.sinusoidal_layout == "concat":
        return None
    C = cfg.d_model
    return torch.cat([torch.arange(0, C, 2), torch.arange(1, C, 2)])


def marian_state_to_hf(cfg: ModelConfig, state: Mapping, *, eos_id: Optional[int] = None) -> tuple[dict, dict]:
    """(config.json dict, state dict) of a transformers MarianMTModel for an lmforge seq2seq model."""
    problems = []
    if cfg.arch != "seq2seq":
        problems.append(f"arch is {cfg.arch}")
    if cfg.norm_position != "post" or cfg.embed_norm:
        problems.append("Marian is post-norm without an embedding norm (norm_position post, embed_norm false)")
    if cfg.pos != "sinusoidal":
        problems.append(f"Marian uses sinusoidal positions, got {cfg.pos}")
    if cfg.norm != "layernorm" or not cfg.bias or cfg.use_qkv_bias != cfg.bias:
        problems.append("Marian needs LayerNorm and biases everywhere (norm layernorm, bias true)")
    if abs(cfg.norm_eps - 1e-5) > 1e-12:
        problems.append(f"Marian's LayerNorm eps is 1e-5, got {cfg.norm_eps}")
    if cfg.mlp not in _ACT_TO_HF:
        problems.append(f"mlp {cfg.mlp} has no Marian equivalent")
    if cfg.kv_heads != cfg.n_heads or cfg.hd * cfg.n_heads != cfg.d_model:
        problems.append("grouped-query attention and a custom head_dim have no Marian equivalent")
    if cfg.pad_id is None:
        problems.append("the model has no pad_id (Marian needs one; set model.pad_id)")
    if problems:
        raise UserError(f"cannot export to Marian: {'; '.join(problems)}")
    import torch

    perm = _channel_order(cfg)
    st = dict(state)

    def rd(t):  # a weight that reads the residual stream: permute its input columns
        return t if perm is None else t[:, perm]

    def wr(t):  # a weight or bias that writes the residual stream, or a norm parameter
        return t if perm is None else t[perm]

    out: dict = {}

    def linear(src: str, dst: str, kind: str, rows: Optional[slice] = None) -> None:
        w, b = st[src + ".weight"], st[src + ".bias"]
        if rows is not None:
            w, b = w[rows], b[rows]
        out[dst + ".weight"] = rd(w) if kind == "read" else wr(w)
        out[dst + ".bias"] = b if kind == "read" else wr(b)

    def norm(src: str, dst: str) -> None:
        out[dst + ".weight"], out[dst + ".bias"] = wr(st[src + ".weight"]), wr(st[src + ".bias"])

    C = cfg.d_model
    share = cfg.src_vocab_size is None
    tok = rd(st["tok_emb.weight"])  # embedding rows are vectors in the residual stream
    if share:
        out["model.shared.weight"] = tok
    else:
        out["model.encoder.embed_tokens.weight"] = rd(st["src_emb.weight"])
        out["model.decoder.embed_tokens.weight"] = tok
    for i in range(cfg.enc_layers):
        m, h = f"encoder.{i}.", f"model.encoder.layers.{i}."
        for j, n in enumerate("qkv"):
            linear(m + "attn.qkv", h + f"self_attn.{n}_proj", "read", slice(j * C, (j + 1) * C))
        linear(m + "attn.proj", h + "self_attn.out_proj", "write")
        norm(m + "norm1", h + "self_attn_layer_norm")
        linear(m + "mlp.fc1", h + "fc1", "read")
        linear(m + "mlp.fc2", h + "fc2", "write")
        norm(m + "norm2", h + "final_layer_norm")
    for i in range(cfg.dec_layers):
        m, h = f"decoder.{i}.", f"model.decoder.layers.{i}."
        for j, n in enumerate("qkv"):
            linear(m + "attn.qkv", h + f"self_attn.{n}_proj", "read", slice(j * C, (j + 1) * C))
        linear(m + "attn.proj", h + "self_attn.out_proj", "write")
        norm(m + "norm1", h + "self_attn_layer_norm")
        linear(m + "cross_attn.q", h + "encoder_attn.q_proj", "read")
        linear(m + "cross_attn.kv", h + "encoder_attn.k_proj", "read", slice(0, C))
        linear(m + "cross_attn.kv", h + "encoder_attn.v_proj", "read", slice(C, 2 * C))
        linear(m + "cross_attn.proj", h + "encoder_attn.out_proj", "write")
        norm(m + "norm2", h + "encoder_attn_layer_norm")
        linear(m + "mlp.fc1", h + "fc1", "read")
        linear(m + "mlp.fc2", h + "fc2", "write")
        norm(m + "norm3", h + "final_layer_norm")
    out["lm_head.weight"] = tok if cfg.tie_embeddings else rd(st["lm_head.weight"])
    bias = st.get("lm_head.bias")
    out["final_logits_bias"] = (bias if bias is not None else torch.zeros(cfg.vocab_size)).reshape(1, -1)
    eos = eos_id if eos_id is not None else 0
    hf_cfg = {
        "architectures": ["MarianMTModel"], "model_type": "marian", "vocab_size": cfg.src_vocab_size or cfg.vocab_size,
        "decoder_vocab_size": cfg.vocab_size, "share_encoder_decoder_embeddings": share,
        "max_position_embeddings": cfg.block_size, "encoder_layers": cfg.enc_layers, "decoder_layers": cfg.dec_layers,
        "encoder_attention_heads": cfg.n_heads, "decoder_attention_heads": cfg.n_heads, "d_model": C,
        "encoder_ffn_dim": cfg.ff, "decoder_ffn_dim": cfg.ff, "activation_function": _ACT_TO_HF[cfg.mlp],
        "scale_embedding": cfg.scale_embeddings, "dropout": cfg.dropout, "attention_dropout": 0.0,
        "activation_dropout": 0.0, "init_std": cfg.init_std, "pad_token_id": cfg.pad_id, "eos_token_id": eos,
        "forced_eos_token_id": eos, "decoder_start_token_id": cfg.decoder_start_id if cfg.decoder_start_id is not None
        else cfg.pad_id, "tie_word_embeddings": cfg.tie_embeddings, "is_encoder_decoder": True,
    }
    return hf_cfg, {k: v.contiguous().clone() for k, v in out.items()}


def export_hf_marian(model, out, tokenizer=None) -> Path:
    """Write a transformers MarianMTModel directory (weights and config; the lmforge tokenizer files are
    copied along for reference, since MarianTokenizer itself expects sentencepiece models)."""
    from safetensors.torch import save_file

    from ..checkpoint import atomic_dir, clean_state_dict, unwrap

    module = unwrap(model)
    hf_cfg, hf_state = marian_state_to_hf(module.cfg, clean_state_dict(module),
                                          eos_id=getattr(tokenizer, "eos_id", None))

    def write(tmp: Path) -> None:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp / "lmforge_tokenizer")

    return atomic_dir(Path(out), write)
