"""Hugging Face interop for BERT: BertModel, BertForSequenceClassification and BertForMaskedLM <-> lmforge's
encoder (models/encoder.py), without ``transformers``.

Weight layout. HF BERT keeps query, key and value as three [C, C] matrices; lmforge stacks them as one
``attn.qkv`` [3C, C] with rows [q; k; v]. Everything else is a rename:

    embeddings.word_embeddings / position_embeddings / token_type_embeddings / LayerNorm
                                                   -> tok_emb / pos_emb / type_emb / emb_norm
    encoder.layer.N.attention.self.{query,key,value}  -> blocks.N.attn.qkv
    encoder.layer.N.attention.output.dense / LayerNorm -> blocks.N.attn.proj / blocks.N.norm1
    encoder.layer.N.intermediate.dense / output.dense / output.LayerNorm -> blocks.N.mlp.fc1 / fc2 / norm2
    pooler.dense -> pooler          classifier -> classifier
    cls.predictions.transform.dense / LayerNorm -> mlm_dense / mlm_norm
    cls.predictions.decoder.weight -> lm_head.weight (tied to tok_emb unless tie_word_embeddings is false)
    cls.predictions.bias -> lm_head.bias

The heads present in the weights decide the lmforge config (``pooler``, ``n_labels``, ``mlm_head``); the
"bert." prefix of the task classes is optional. Only absolute positions are supported.

``load_hf_encdec`` is the dispatch point the checkpoint loader and the CLI use for the encoder and
encoder-decoder families (BERT here, Marian in hf_marian.py); it returns None for other model types.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from ..config import ConfigError, ModelConfig, UserError

_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def hf_model_type(directory: Path) -> Optional[str]:
    """model_type of an HF directory's config.json (None when unreadable)."""
    try:
        return json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def load_hf_encdec(directory, device: str = "cpu", dtype=None):
    """(model, tokenizer) for a BERT or Marian directory, or None for any other model type."""
    mt = hf_model_type(Path(directory))
    if mt == "bert":
        return load_hf_bert(directory, device=device, dtype=dtype)
    if mt == "marian":
        from .hf_marian import load_hf_marian

        return load_hf_marian(directory, device=device, dtype=dtype)
    return None


def import_hf_encdec(src, out) -> Optional[Path]:
    """Write an lmforge checkpoint of a BERT or Marian directory; None for other model types."""
    from ..checkpoint import save_checkpoint

    src = Path(src)
    if not src.is_dir():
        raise UserError(f"Hugging Face model directory not found: {src}")
    mt = hf_model_type(src)
    if mt not in ("bert", "marian"):
        return None
    model, tokenizer = load_hf_encdec(src)
    extra = {"imported_from": {"format": "hf", "path": str(src.resolve()), "model_type": mt}}
    return save_checkpoint(out, model, tokenizer=tokenizer, extra=extra)


def build_encdec(cfg: ModelConfig, state: dict, *, device="cpu", dtype=None, where: str = "model"):
    """Build an encoder/seq2seq module from a converted state dict, strictly (one clear line on mismatch)."""
    import torch

    from ..checkpoint import load_state_into
    from ..models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device="cpu")
    load_state_into(model, state, where)
    if cfg.tie_embeddings and getattr(model, "lm_head", None) is not None:
        model.lm_head.weight = model.tok_emb.weight
    if dtype is not None or str(device) != "cpu":
        model = model.to(device=device, dtype=dtype)
    return model.eval()


# ==================================================================================================
# BERT -> lmforge


def _bert_prefix(keys) -> str:
    return "bert." if any(k.startswith("bert.embeddings.") for k in keys) else ""


def bert_config_from_hf(hf_cfg: dict, keys) -> ModelConfig:
    """The lmforge ModelConfig of a BERT config.json plus the weight names (which heads are present)."""
    keys = list(keys)
    pre = _bert_prefix(keys)
    g = hf_cfg.get
    if (g("position_embedding_type") or "absolute") != "absolute":
        raise UserError(f"unsupported BERT position_embedding_type {g('position_embedding_type')!r}; lmforge "
                        f"converts absolute positions only")
    act = g("hidden_act", "gelu")
    if act not in _ACT_FROM_HF:
        raise UserError(f"unsupported BERT hidden_act {act!r} (supported: {', '.join(_ACT_FROM_HF)})")
    has_cls = "classifier.weight" in keys
    n_labels = 0
    if has_cls:
        n_labels = int(g("num_labels") or len(g("id2label") or {}) or 2)
    try:
        return ModelConfig(
            arch="encoder", vocab_size=int(g("vocab_size", 30522)), block_size=int(g("max_position_embeddings", 512)),
            n_layers=int(g("num_hidden_layers", 12)), n_heads=int(g("num_attention_heads", 12)),
            d_model=int(g("hidden_size", 768)), d_ff=int(g("intermediate_size", 3072)), mlp=_ACT_FROM_HF[act],
            norm="layernorm", norm_eps=float(g("layer_norm_eps", 1e-12)), pos="learned", bias=True,
            tie_embeddings=bool(g("tie_word_embeddings", True)), dropout=float(g("hidden_dropout_prob", 0.1) or 0.0),
            init_std=float(g("initializer_range", 0.02)), norm_position="post", embed_norm=True,
            type_vocab_size=int(g("type_vocab_size", 2)), head_bias=True,
            pooler=f"{pre}pooler.dense.weight" in keys, n_labels=n_labels,
            mlm_head="cls.predictions.transform.dense.weight" in keys,
            pad_id=g("pad_token_id")).validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise UserError(f"BERT config cannot be represented: {e}") from None


def bert_state_from_hf(cfg: ModelConfig, hf_state: Mapping) -> dict:
    """lmforge state dict (names as in models/encoder.py) of a BERT state dict."""
    import torch

    pre = _bert_prefix(hf_state.keys())
    used: set[str] = set()

    def take(name: str):
        if name not in hf_state:
            raise UserError(f"BERT weights: tensor {name!r} is missing")
        used.add(name)
        return hf_state[name]

    out = {}

    def linear(dst: str, src: str) -> None:
        out[dst + ".weight"], out[dst + ".bias"] = take(src + ".weight"), take(src + ".bias")

    e = pre + "embeddings."
    out["tok_emb.weight"] = take(e + "word_embeddings.weight")
    out["pos_emb.weight"] = take(e + "position_embeddings.weight")
    out["type_emb.weight"] = take(e + "token_type_embeddings.weight")
    linear("emb_norm", e + "LayerNorm")
    for i in range(cfg.n_layers):
        h, m = f"{pre}encoder.layer.{i}.", f"blocks.{i}."
        a = h + "attention.self."
        out[m + "attn.qkv.weight"] = torch.cat([take(a + n + ".weight") for n in ("query", "key", "value")])
        out[m + "attn.qkv.bias"] = torch.cat([take(a + n + ".bias") for n in ("query", "key", "value")])
        linear(m + "attn.proj", h + "attention.output.dense")
        linear(m + "norm1", h + "attention.output.LayerNorm")
        linear(m + "mlp.fc1", h + "intermediate.dense")
        linear(m + "mlp.fc2", h + "output.dense")
        linear(m + "norm2", h + "output.LayerNorm")
    if cfg.pooler:
        linear("pooler", pre + "pooler.dense")
    if cfg.n_labels:
        linear("classifier", "classifier")
    if cfg.mlm_head:
        p = "cls.predictions."
        linear("mlm_dense", p + "transform.dense")
        linear("mlm_norm", p + "transform.LayerNorm")
        out["lm_head.bias"] = take(p + "bias") if p + "bias" in hf_state else take(p + "decoder.bias")
        if p + "decoder.bias" in hf_state:
            used.add(p + "decoder.bias")
        if cfg.tie_embeddings:
            used.add(p + "decoder.weight")  # a stored copy of the embedding; the tie wins, as in HF
        else:
            out["lm_head.weight"] = take(p + "decoder.weight")
    ignorable = ("position_ids", "cls.seq_relationship.", "embeddings.token_type_ids")
    left = [k for k in hf_state.keys() if k not in used and not any(s in k for s in ignorable)]
    if left:
        raise UserError(f"BERT weights: {len(left)} tensors lmforge does not know how to convert, e.g. {left[0]!r}")
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def load_hf_bert(directory, device: str = "cpu", dtype=None):
    """(EncoderModel, Tokenizer | None) from a BERT directory (BertModel, ...ForSequenceClassification,
    ...ForMaskedLM)."""
    from .hf import _LazyWeights, _load_tokenizer, read_hf_config

    d = Path(directory)
    hf_cfg = read_hf_config(d)
    weights = _LazyWeights(d)
    cfg = bert_config_from_hf(hf_cfg, weights.keys())
    state = bert_state_from_hf(cfg, weights)
    model = build_encdec(cfg, state, device=device, dtype=dtype, where=f"Hugging Face model {d}")
    return model, _load_tokenizer(d)


# ==================================================================================================
# lmforge -> BERT


def bert_state_to_hf(cfg: ModelConfig, state: Mapping, *, pad_id: Optional[int] = None) -> tuple[dict, dict]:
    """(config.json dict, state dict) of a transformers BERT model for an lmforge encoder. The architecture is
    BertForSequenceClassification with a classifier, BertForMaskedLM with an MLM head, else BertModel."""
    problems = []
    if cfg.arch != "encoder":
        problems.append(f"arch is {cfg.arch}")
    if cfg.norm != "layernorm" or not cfg.bias:
        problems.append("BERT needs LayerNorm with biases (norm layernorm, bias true)")
    if cfg.pos != "learned":
        problems.append(f"BERT needs learned positions, got {cfg.pos}")
    if cfg.norm_position != "post" or not cfg.embed_norm:
        problems.append("BERT is post-norm with an embedding norm (norm_position post, embed_norm true)")
    if cfg.type_vocab_size < 1:
        problems.append("BERT needs a token-type embedding (type_vocab_size >= 1)")
    if cfg.mlp not in _ACT_TO_HF:
        problems.append(f"mlp {cfg.mlp} has no BERT equivalent")
    if cfg.scale_embeddings or cfg.kv_heads != cfg.n_heads or cfg.hd * cfg.n_heads != cfg.d_model:
        problems.append("scaled embeddings, grouped-query attention and a custom head_dim have no BERT equivalent")
    if cfg.use_qkv_bias != cfg.bias:
        problems.append("BERT has q/k/v biases exactly when the other layers have them")
    if cfg.n_labels and not cfg.pooler:
        problems.append("a BERT classifier reads the pooler, which this model lacks")
    if cfg.mlm_head and not cfg.head_bias:
        problems.append("BERT's masked-LM decoder has a bias (head_bias true)")
    if problems:
        raise UserError(f"cannot export to BERT: {'; '.join(problems)}")
    arch = ("BertForSequenceClassification" if cfg.n_labels else "BertForMaskedLM" if cfg.mlm_head else "BertModel")
    hf_cfg = {
        "architectures": [arch], "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.ff,
        "hidden_act": _ACT_TO_HF[cfg.mlp], "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout, "max_position_embeddings": cfg.block_size,
        "type_vocab_size": cfg.type_vocab_size, "initializer_range": cfg.init_std, "layer_norm_eps": cfg.norm_eps,
        "pad_token_id": cfg.pad_id if cfg.pad_id is not None else (pad_id or 0),
        "position_embedding_type": "absolute", "tie_word_embeddings": cfg.tie_embeddings,
    }
    if cfg.n_labels:
        hf_cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.n_labels)}
        hf_cfg["label2id"] = {f"LABEL_{i}": i for i in range(cfg.n_labels)}
    st = dict(state)
    out = {}
    pre = "" if arch == "BertModel" else "bert."

    def linear(src: str, dst: str) -> None:
        out[dst + ".weight"], out[dst + ".bias"] = st[src + ".weight"], st[src + ".bias"]

    e = pre + "embeddings."
    out[e + "word_embeddings.weight"] = st["tok_emb.weight"]
    out[e + "position_embeddings.weight"] = st["pos_emb.weight"]
    out[e + "token_type_embeddings.weight"] = st["type_emb.weight"]
    linear("emb_norm", e + "LayerNorm")
    C = cfg.d_model
    for i in range(cfg.n_layers):
        h, m = f"{pre}encoder.layer.{i}.", f"blocks.{i}."
        for j, n in enumerate(("query", "key", "value")):
            out[h + f"attention.self.{n}.weight"] = st[m + "attn.qkv.weight"][j * C:(j + 1) * C]
            out[h + f"attention.self.{n}.bias"] = st[m + "attn.qkv.bias"][j * C:(j + 1) * C]
        linear(m + "attn.proj", h + "attention.output.dense")
        linear(m + "norm1", h + "attention.output.LayerNorm")
        linear(m + "mlp.fc1", h + "intermediate.dense")
        linear(m + "mlp.fc2", h + "output.dense")
        linear(m + "norm2", h + "output.LayerNorm")
    if cfg.pooler and arch != "BertForMaskedLM":  # BertForMaskedLM has no pooler
        linear("pooler", pre + "pooler.dense")
    if cfg.n_labels:
        linear("classifier", "classifier")
    elif cfg.mlm_head:
        p = "cls.predictions."
        linear("mlm_dense", p + "transform.dense")
        linear("mlm_norm", p + "transform.LayerNorm")
        out[p + "bias"] = st["lm_head.bias"]
        out[p + "decoder.weight"] = st["tok_emb.weight"] if cfg.tie_embeddings else st["lm_head.weight"]
    return hf_cfg, {k: v.contiguous().clone() for k, v in out.items()}


def export_hf_bert(model, tokenizer, out) -> Path:
    """Write a transformers BERT directory (see ``bert_state_to_hf``); appears atomically."""
    from safetensors.torch import save_file

    from ..checkpoint import atomic_dir, clean_state_dict, unwrap

    module = unwrap(model)
    hf_cfg, hf_state = bert_state_to_hf(module.cfg, clean_state_dict(module),
                                        pad_id=getattr(tokenizer, "pad_id", None))

    def write(tmp: Path) -> None:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)

    return atomic_dir(Path(out), write)


def export_hf_encdec(model_path, out) -> Optional[Path]:
    """Export an lmforge encoder (to BERT) or seq2seq model (to Marian); None for decoder models."""
    from ..checkpoint import load_checkpoint, read_config, resolve

    kind, ckpt = resolve(model_path)
    if kind != "lmforge" or read_config(ckpt)[0].arch == "decoder":
        return None
    model, tokenizer, _meta = load_checkpoint(ckpt)
    if model.cfg.arch == "encoder":
        return export_hf_bert(model, tokenizer, out)
    from .hf_marian import export_hf_marian

    return export_hf_marian(model, out, tokenizer=tokenizer)
