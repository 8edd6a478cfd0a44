"""Hugging Face interop: read and write ``transformers`` model directories without ``transformers``.

Supported families (``model_type`` in config.json):

    gpt2     GPT2LMHeadModel     learned positions, LayerNorm, GELU (tanh), biases, Conv1D weights
    llama    LlamaForCausalLM    RoPE (plain, linear or Llama-3 scaling), RMSNorm, SwiGLU, GQA
    mistral  MistralForCausalLM  Llama with a sliding attention window
    qwen2    Qwen2ForCausalLM    Llama with biases on the q/k/v projections only
    qwen3    Qwen3ForCausalLM    Llama with RMS QK-norm per head

Weight layouts. HF Llama-style models keep q_proj, k_proj, v_proj and gate_proj, up_proj as separate
matrices; lmforge stacks them (``attn.qkv`` rows are [q; k; v], ``mlp.fc1`` rows are [gate; up]). GPT-2
uses ``Conv1D`` layers whose weight is stored [in, out], the transpose of ``nn.Linear``; its ``c_attn``
already stacks [q; k; v] along the output axis. RoPE needs no permutation: lmforge uses the same
"rotate half" layout as HF Llama.

Biases. lmforge has two switches: ``bias`` (attention output, MLP, LayerNorm) and ``qkv_bias``. HF
families that have fewer biases than lmforge needs get zero biases on import (exact: x + 0 = x); on export,
an lmforge bias that the HF family has no slot for must be all zeros or the export is refused.

Sliding windows (Mistral, Qwen with ``use_sliding_window``): lmforge attends over the whole context, which
is identical to sliding-window attention as long as the sequence is no longer than the window. So the
imported ``block_size`` is capped at the window; the model is exact within its block_size.

``config_from_hf`` and ``state_from_hf`` are pure (dict in, dict out); ``load_hf`` reads a directory
lazily, converting one tensor at a time so the converted model is the only full copy in memory.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, ModelConfig, UserError

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
_ARCH_TO_TYPE = {
    "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2",
    "LlamaForCausalLM": "llama", "LlamaModel": "llama",
    "MistralForCausalLM": "mistral", "MistralModel": "mistral",
    "Qwen2ForCausalLM": "qwen2", "Qwen2Model": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Qwen3Model": "qwen3",
}
# Defaults of the transformers config classes, for keys that save_pretrained may leave out of config.json.
_DEFAULTS = {
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
             "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
                "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "sliding_window": 4096},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 32768,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "sliding_window": 4096},
    "qwen3": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "sliding_window": 4096},
}
_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
             "gelu": "gelu"}
# Non-weight entries some checkpoints carry (causal-mask buffers, cached RoPE tables).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


# ==================================================================================================
# Config


def _model_type(hf_cfg: dict) -> str:
    mt = hf_cfg.get("model_type")
    archs = hf_cfg.get("architectures") or []
    if mt is None:
        for a in archs:
            if a in _ARCH_TO_TYPE:
                mt = _ARCH_TO_TYPE[a]
                break
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"unsupported Hugging Face model_type {mt!r} (architectures {archs}); lmforge converts "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    for a in archs:
        if not a.endswith(("ForCausalLM", "LMHeadModel", "Model")):
            raise UserError(f"unsupported Hugging Face architecture {a!r}: only causal language models "
                            f"(…ForCausalLM) can be converted")
    return mt


def _get(hf_cfg: dict, mt: str, key: str, default: Any = None) -> Any:
    """The value in config.json (an explicit null included), else the transformers class default."""
    if key in hf_cfg:
        return hf_cfg[key]
    return _DEFAULTS.get(mt, {}).get(key, default)


def _rope_params(hf_cfg: dict) -> dict:
    """One flat dict {rope_type, rope_theta, factor, ...} from either the transformers 5 form
    (``rope_parameters``, possibly nested per layer type) or the older ``rope_theta`` + ``rope_scaling``."""
    params: dict = {}
    new = hf_cfg.get("rope_parameters")
    if isinstance(new, dict) and new:
        if all(isinstance(v, dict) for v in new.values()):  # nested by layer type
            distinct = {json.dumps(v, sort_keys=True) for v in new.values() if v}
            if len(distinct) > 1:
                raise UserError(f"unsupported rope_parameters: different RoPE per layer type ({sorted(new)})")
            new = next(v for v in new.values() if v)
        params.update(new)
    old = hf_cfg.get("rope_scaling")
    if isinstance(old, dict) and old:
        for k, v in old.items():
            params.setdefault(k, v)
    if "rope_theta" not in params:
        params["rope_theta"] = hf_cfg.get("rope_theta", 10000.0)
    rtype = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rtype
    return params


def config_from_hf(hf_cfg: dict) -> ModelConfig:
    """The lmforge ModelConfig of a transformers config.json dict. Unsupported options raise UserError."""
    try:
        cfg = _config_from_hf(hf_cfg)
    except (TypeError, KeyError, ValueError) as e:  # a missing or malformed value in config.json
        if isinstance(e, ConfigError):
            raise UserError(f"Hugging Face config cannot be represented: {e}") from None
        raise UserError(f"Hugging Face config.json has a missing or malformed value ({type(e).__name__}: {e})") \
            from None
    try:
        return cfg.validate()
    except ConfigError as e:
        raise UserError(f"Hugging Face config cannot be represented: {e}") from None


def _config_from_hf(hf_cfg: dict) -> ModelConfig:
    mt = _model_type(hf_cfg)
    g = lambda key, default=None: _get(hf_cfg, mt, key, default)  # noqa: E731
    if mt == "gpt2":
        act = g("activation_function")
        if act not in _GPT2_ACT:
            raise UserError(f"unsupported GPT-2 option activation_function={act!r} (supported: {sorted(_GPT2_ACT)})")
        if g("scale_attn_weights", True) is False:
            raise UserError("unsupported GPT-2 option scale_attn_weights=false (lmforge always scales by 1/sqrt(D))")
        if g("scale_attn_by_inverse_layer_idx", False):
            raise UserError("unsupported GPT-2 option scale_attn_by_inverse_layer_idx=true")
        if g("add_cross_attention", False):
            raise UserError("unsupported GPT-2 option add_cross_attention=true (decoder-only models only)")
        d = g("n_embd")
        cfg = ModelConfig(
            vocab_size=g("vocab_size"), block_size=g("n_positions"), n_layers=g("n_layer"), n_heads=g("n_head"),
            d_model=d, d_ff=g("n_inner") or 4 * d, mlp=_GPT2_ACT[act], norm="layernorm",
            norm_eps=float(g("layer_norm_epsilon")), pos="learned", bias=True, qkv_bias=None,
            tie_embeddings=bool(g("tie_word_embeddings")), init_std=float(g("initializer_range") or 0.02),
        )
    else:
        act = g("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UserError(f"unsupported {mt} option hidden_act={act!r} (lmforge's SwiGLU uses silu)")
        rp = _rope_params(hf_cfg)
        if rp.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
            raise UserError(f"unsupported {mt} option partial_rotary_factor={rp['partial_rotary_factor']}")
        max_pos = int(g("max_position_embeddings"))
        rope = dict(rope_theta=float(rp["rope_theta"]))
        rtype = rp["rope_type"]
        if rtype == "default":
            pass
        elif rtype == "linear":
            rope.update(rope_scaling="linear", rope_factor=float(rp["factor"]))
        elif rtype == "llama3":
            rope.update(rope_scaling="llama3", rope_factor=float(rp["factor"]),
                        rope_low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
                        rope_high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
                        rope_original_max_positions=int(rp.get("original_max_position_embeddings") or max_pos))
        else:
            raise UserError(f"unsupported {mt} option rope scaling type {rtype!r} (supported: default, linear, "
                            f"llama3)")
        heads = int(g("num_attention_heads"))
        d = int(g("hidden_size"))
        kv = int(g("num_key_value_heads") or heads)
        head_dim = int(g("head_dim") or d // heads)
        # Biases: which HF projections have them.
        if mt == "qwen2":
            qkv_b, o_b, mlp_b = True, False, False
        elif mt == "mistral":
            qkv_b = o_b = mlp_b = False
        else:  # llama, qwen3
            qkv_b = o_b = bool(g("attention_bias", False))
            mlp_b = bool(g("mlp_bias", False)) if mt == "llama" else False
        bias = o_b or mlp_b
        # Sliding window: exact as long as sequences fit in it, so cap the context (see module doc).
        window = None
        if mt == "mistral":
            window = g("sliding_window")
        elif g("use_sliding_window", False):
            layer_types = hf_cfg.get("layer_types")
            if layer_types is None or "sliding_attention" in layer_types:
                window = g("sliding_window")
        block_size = max_pos if window is None else min(max_pos, int(window))
        cfg = ModelConfig(
            vocab_size=int(g("vocab_size")), block_size=block_size, n_layers=int(g("num_hidden_layers")),
            n_heads=heads, n_kv_heads=kv if kv != heads else None, d_model=d,
            head_dim=head_dim if head_dim * heads != d else None, d_ff=int(g("intermediate_size")),
            mlp="swiglu", norm="rmsnorm", norm_eps=float(g("rms_norm_eps")), pos="rope",
            bias=bias, qkv_bias=qkv_b if qkv_b != bias else None, qk_norm=(mt == "qwen3"),
            tie_embeddings=bool(g("tie_word_embeddings")), init_std=float(g("initializer_range") or 0.02),
            **rope,
        )
    return cfg


# ==================================================================================================
# Weights: HF -> lmforge


class _Taker:
    """Reads tensors out of a (possibly lazy) mapping by HF name and remembers which were used."""

    def __init__(self, state: Mapping, prefix: str, consume: bool):
        self.state, self.prefix, self.consume = state, prefix, consume
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return self.prefix + name in self.state

    def __call__(self, name: str, *, optional: bool = False):
        key = self.prefix + name
        if key not in self.state:
            if optional:
                return None
            raise UserError(f"Hugging Face weights: tensor {key!r} is missing")
        self.used.add(key)
        t = self.state[key]
        if self.consume and isinstance(self.state, dict):
            del self.state[key]
        return t


def _detect_prefix(keys, inner: str, root: str) -> str:
    """"model." / "transformer." when the checkpoint was saved from the LM-head class, "" otherwise."""
    return root if any(k.startswith(root + inner) for k in keys) else ""


def state_from_hf(hf_cfg: dict, hf_state: Mapping, *, dtype=None, consume: bool = False) -> dict:
    """lmforge state dict (names as in models/decoder.py) from a transformers state dict.

    ``hf_state`` may be any mapping of name -> tensor (a lazy one reads each tensor on access). With
    ``consume=True`` and a plain dict, tensors are removed from it as they are converted, so the two full
    copies never coexist. Weights nobody knows how to convert raise UserError (an unsupported variant)."""
    import torch

    cfg = config_from_hf(hf_cfg)
    mt = _model_type(hf_cfg)
    keys = list(hf_state.keys())
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        out[name] = t.contiguous()

    def zeros(n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, dtype=like.dtype)

    if mt == "gpt2":
        base = _detect_prefix(keys, "wte.weight", "transformer.")
        take = _Taker(hf_state, base, consume)
        head = _Taker(hf_state, "", consume)
        C = cfg.d_model

        def conv1d(name: str, n_out: int):
            w = take(name)
            if w.dim() != 2 or w.shape[1] != n_out:
                raise UserError(f"Hugging Face weights: {base + name} has shape {tuple(w.shape)}, expected a "
                                f"GPT-2 Conv1D weight [in, {n_out}]")
            return w.t()  # Conv1D stores [in, out]; nn.Linear wants [out, in]

        put("tok_emb.weight", take("wte.weight"))
        put("pos_emb.weight", take("wpe.weight"))
        for i in range(cfg.n_layers):
            p, q = f"h.{i}.", f"blocks.{i}."
            put(q + "norm1.weight", take(p + "ln_1.weight"))
            put(q + "norm1.bias", take(p + "ln_1.bias"))
            put(q + "attn.qkv.weight", conv1d(p + "attn.c_attn.weight", 3 * C))
            put(q + "attn.qkv.bias", take(p + "attn.c_attn.bias"))
            put(q + "attn.proj.weight", conv1d(p + "attn.c_proj.weight", C))
            put(q + "attn.proj.bias", take(p + "attn.c_proj.bias"))
            put(q + "norm2.weight", take(p + "ln_2.weight"))
            put(q + "norm2.bias", take(p + "ln_2.bias"))
            put(q + "mlp.fc1.weight", conv1d(p + "mlp.c_fc.weight", cfg.ff))
            put(q + "mlp.fc1.bias", take(p + "mlp.c_fc.bias"))
            put(q + "mlp.fc2.weight", conv1d(p + "mlp.c_proj.weight", C))
            put(q + "mlp.fc2.bias", take(p + "mlp.c_proj.bias"))
        put("norm_f.weight", take("ln_f.weight"))
        put("norm_f.bias", take("ln_f.bias"))
        lm_head_name = "lm_head.weight"
    else:
        base = _detect_prefix(keys, "embed_tokens.weight", "model.")
        take = _Taker(hf_state, base, consume)
        head = _Taker(hf_state, "", consume)
        put("tok_emb.weight", take("embed_tokens.weight"))
        for i in range(cfg.n_layers):
            p, q = f"layers.{i}.", f"blocks.{i}."
            put(q + "norm1.weight", take(p + "input_layernorm.weight"))
            put(q + "norm2.weight", take(p + "post_attention_layernorm.weight"))
            a = p + "self_attn."
            put(q + "attn.qkv.weight", torch.cat([take(a + "q_proj.weight"), take(a + "k_proj.weight"),
                                                  take(a + "v_proj.weight")], dim=0))
            if cfg.use_qkv_bias:
                bs = [take(a + n + "_proj.bias", optional=True) for n in ("q", "k", "v")]
                sizes = [cfg.n_heads * cfg.hd, cfg.kv_heads * cfg.hd, cfg.kv_heads * cfg.hd]
                ref = out[q + "attn.qkv.weight"]
                put(q + "attn.qkv.bias", torch.cat([b if b is not None else zeros(n, ref) for b, n in zip(bs, sizes)]))
            put(q + "attn.proj.weight", take(a + "o_proj.weight"))
            if cfg.bias:
                b = take(a + "o_proj.bias", optional=True)
                put(q + "attn.proj.bias", b if b is not None else zeros(cfg.d_model, out[q + "attn.proj.weight"]))
            if cfg.qk_norm:
                put(q + "attn.q_norm.weight", take(a + "q_norm.weight"))
                put(q + "attn.k_norm.weight", take(a + "k_norm.weight"))
            m = p + "mlp."
            put(q + "mlp.fc1.weight", torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")], dim=0))
            put(q + "mlp.fc2.weight", take(m + "down_proj.weight"))
            if cfg.bias:
                ref = out[q + "mlp.fc2.weight"]
                g_b, u_b, d_b = (take(m + n + ".bias", optional=True) for n in ("gate_proj", "up_proj", "down_proj"))
                put(q + "mlp.fc1.bias", torch.cat([g_b if g_b is not None else zeros(cfg.ff, ref),
                                                   u_b if u_b is not None else zeros(cfg.ff, ref)]))
                put(q + "mlp.fc2.bias", d_b if d_b is not None else zeros(cfg.d_model, ref))
        put("norm_f.weight", take("norm.weight"))
        lm_head_name = "lm_head.weight"

    if cfg.tie_embeddings:
        if head.has(lm_head_name):
            head(lm_head_name)  # a copy of the embedding some checkpoints store; the tie wins, as in HF
    else:
        if not head.has(lm_head_name):
            raise UserError("Hugging Face weights: config says tie_word_embeddings=false but lm_head.weight "
                            "is missing")
        put("lm_head.weight", head(lm_head_name))

    used = take.used | head.used
    left = [k for k in keys if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if left:
        raise UserError(f"Hugging Face weights of an unsupported {mt} variant: unexpected tensors "
                        f"{left[:3]}{'...' if len(left) > 3 else ''}")
    return out


# ==================================================================================================
# Weights and config: lmforge -> HF


def hf_family(cfg: ModelConfig) -> str:
    """The transformers model_type that represents ``cfg`` exactly, or UserError saying why none does."""
    why = []
    if cfg.arch != "decoder":
        raise UserError(f"cannot export to Hugging Face: model arch {cfg.arch!r} has no HF causal-LM family")
    if cfg.scale_embeddings:
        why.append("scale_embeddings=true (no GPT-2/Llama family scales embeddings)")
    if cfg.pos == "learned":
        if cfg.norm != "layernorm":
            why.append(f"learned positions with norm={cfg.norm} (GPT-2 uses layernorm)")
        if cfg.mlp not in ("gelu", "gelu_tanh"):
            why.append(f"learned positions with mlp={cfg.mlp} (GPT-2 uses gelu/gelu_tanh)")
        if cfg.kv_heads != cfg.n_heads:
            why.append("grouped-query attention (GPT-2 has n_kv_heads == n_heads)")
        if cfg.hd * cfg.n_heads != cfg.d_model:
            why.append(f"head_dim={cfg.hd} != d_model/n_heads (GPT-2 derives it)")
        if cfg.qk_norm:
            why.append("qk_norm (GPT-2 has none)")
        family = "gpt2"
    elif cfg.pos == "rope":
        if cfg.norm != "rmsnorm":
            why.append(f"RoPE with norm={cfg.norm} (Llama uses rmsnorm)")
        if cfg.mlp != "swiglu":
            why.append(f"RoPE with mlp={cfg.mlp} (Llama uses swiglu)")
        if cfg.qk_norm:
            family = "qwen3"
        elif cfg.use_qkv_bias and not cfg.bias:
            family = "qwen2"
        else:
            family = "llama"
    else:
        raise UserError(f"cannot export to Hugging Face: pos={cfg.pos!r} positions have no Hugging Face "
                        f"GPT-2/Llama-family equivalent (supported: learned for GPT-2, rope for Llama)")
    if why:
        raise UserError(f"cannot export to Hugging Face ({family} family): {'; '.join(why)}")
    return family


def _dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def state_to_hf(cfg: ModelConfig, state: Mapping, *, special_ids: Optional[dict] = None) -> tuple[dict, dict]:
    """(config.json dict, state dict) for transformers. Raises UserError before producing anything when
    no HF family represents ``cfg`` or when an lmforge bias has no HF slot and is not all zeros."""
    import torch

    family = hf_family(cfg)
    special_ids = special_ids or {}
    st = dict(state)
    if "lm_head.weight" not in st and not cfg.tie_embeddings:
        raise UserError("cannot export: untied model without lm_head.weight")
    ref = st["tok_emb.weight"]
    dtype_name = _dtype_name(ref)

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=ref.dtype, device=ref.device)

    def must_be_zero(name: str, why: str) -> None:
        t = st.get(name)
        if t is not None and bool(t.detach().ne(0).any()):
            raise UserError(f"cannot export to Hugging Face ({family} family): {name} is non-zero but {why}")

    def c(t: torch.Tensor) -> torch.Tensor:
        # Whole parameters are written as they are (no copy); pieces of a stacked matrix (q/k/v, gate/up)
        # are cloned, because safetensors refuses tensors that share storage.
        t = t.detach().to("cpu")
        whole = t.storage_offset() == 0 and t.is_contiguous() and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if whole:
            return t
        return t.clone() if t.is_contiguous() else t.contiguous()  # either way: a storage of its own

    out: dict[str, torch.Tensor] = {}
    L = cfg.n_layers
    if family == "gpt2":
        C = cfg.d_model
        out["transformer.wte.weight"] = c(st["tok_emb.weight"])
        out["transformer.wpe.weight"] = c(st["pos_emb.weight"])
        for i in range(L):
            p, q = f"transformer.h.{i}.", f"blocks.{i}."
            out[p + "ln_1.weight"] = c(st[q + "norm1.weight"])
            out[p + "ln_1.bias"] = c(st.get(q + "norm1.bias", zeros(C)))
            out[p + "attn.c_attn.weight"] = c(st[q + "attn.qkv.weight"].t())
            out[p + "attn.c_attn.bias"] = c(st.get(q + "attn.qkv.bias", zeros(3 * C)))
            out[p + "attn.c_proj.weight"] = c(st[q + "attn.proj.weight"].t())
            out[p + "attn.c_proj.bias"] = c(st.get(q + "attn.proj.bias", zeros(C)))
            out[p + "ln_2.weight"] = c(st[q + "norm2.weight"])
            out[p + "ln_2.bias"] = c(st.get(q + "norm2.bias", zeros(C)))
            out[p + "mlp.c_fc.weight"] = c(st[q + "mlp.fc1.weight"].t())
            out[p + "mlp.c_fc.bias"] = c(st.get(q + "mlp.fc1.bias", zeros(cfg.ff)))
            out[p + "mlp.c_proj.weight"] = c(st[q + "mlp.fc2.weight"].t())
            out[p + "mlp.c_proj.bias"] = c(st.get(q + "mlp.fc2.bias", zeros(C)))
        out["transformer.ln_f.weight"] = c(st["norm_f.weight"])
        out["transformer.ln_f.bias"] = c(st.get("norm_f.bias", zeros(C)))
        hf_cfg = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
            "n_embd": C, "n_layer": L, "n_head": cfg.n_heads, "n_inner": cfg.ff,
            "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps, "initializer_range": cfg.init_std,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        }
    else:
        H, K, D, F = cfg.n_heads, cfg.kv_heads, cfg.hd, cfg.ff
        if family == "qwen2":
            attn_bias, mlp_bias = True, False  # fixed in Qwen2: q/k/v biases, none elsewhere
        elif family == "qwen3":
            attn_bias, mlp_bias = cfg.use_qkv_bias, False  # attention_bias covers q, k, v and o
            if cfg.bias and not cfg.use_qkv_bias:
                attn_bias = False
        else:  # llama: attention_bias covers q, k, v, o; mlp_bias gate, up, down
            attn_bias = cfg.use_qkv_bias or cfg.bias
            mlp_bias = cfg.bias
        for i in range(L):
            q = f"blocks.{i}."
            if not attn_bias:
                must_be_zero(q + "attn.qkv.bias", "the HF family has no q/k/v bias")
                must_be_zero(q + "attn.proj.bias", "the HF family has no attention output bias")
            if family == "qwen2":
                must_be_zero(q + "attn.proj.bias", "Qwen2 has no attention output bias")
            if not mlp_bias:
                must_be_zero(q + "mlp.fc1.bias", "the HF family has no MLP bias")
                must_be_zero(q + "mlp.fc2.bias", "the HF family has no MLP bias")
        out["model.embed_tokens.weight"] = c(st["tok_emb.weight"])
        for i in range(L):
            p, q = f"model.layers.{i}.", f"blocks.{i}."
            a, m = p + "self_attn.", p + "mlp."
            out[p + "input_layernorm.weight"] = c(st[q + "norm1.weight"])
            out[p + "post_attention_layernorm.weight"] = c(st[q + "norm2.weight"])
            wq, wk, wv = st[q + "attn.qkv.weight"].split([H * D, K * D, K * D], dim=0)
            out[a + "q_proj.weight"], out[a + "k_proj.weight"], out[a + "v_proj.weight"] = c(wq), c(wk), c(wv)
            out[a + "o_proj.weight"] = c(st[q + "attn.proj.weight"])
            if attn_bias:
                b = st.get(q + "attn.qkv.bias", zeros((H + 2 * K) * D))
                bq, bk, bv = b.split([H * D, K * D, K * D])
                out[a + "q_proj.bias"], out[a + "k_proj.bias"], out[a + "v_proj.bias"] = c(bq), c(bk), c(bv)
                if family != "qwen2":
                    out[a + "o_proj.bias"] = c(st.get(q + "attn.proj.bias", zeros(cfg.d_model)))
            if cfg.qk_norm:
                out[a + "q_norm.weight"] = c(st[q + "attn.q_norm.weight"])
                out[a + "k_norm.weight"] = c(st[q + "attn.k_norm.weight"])
            gate, up = st[q + "mlp.fc1.weight"].split([F, F], dim=0)
            out[m + "gate_proj.weight"], out[m + "up_proj.weight"] = c(gate), c(up)
            out[m + "down_proj.weight"] = c(st[q + "mlp.fc2.weight"])
            if mlp_bias:
                b = st.get(q + "mlp.fc1.bias", zeros(2 * F))
                bg, bu = b.split([F, F])
                out[m + "gate_proj.bias"], out[m + "up_proj.bias"] = c(bg), c(bu)
                out[m + "down_proj.bias"] = c(st.get(q + "mlp.fc2.bias", zeros(cfg.d_model)))
        out["model.norm.weight"] = c(st["norm_f.weight"])
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        if cfg.rope_scaling == "linear":
            rope_parameters.update(rope_type="linear", factor=cfg.rope_factor)
        elif cfg.rope_scaling == "llama3":
            rope_parameters.update(rope_type="llama3", factor=cfg.rope_factor,
                                   low_freq_factor=cfg.rope_low_freq_factor,
                                   high_freq_factor=cfg.rope_high_freq_factor,
                                   original_max_position_embeddings=cfg.rope_original_max_positions)
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
        hf_cfg = {
            "architectures": [arch], "model_type": family,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": F,
            "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": K, "head_dim": D,
            "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
            "initializer_range": cfg.init_std, "attention_dropout": cfg.dropout,
            # Both spellings of the RoPE settings: transformers >= 5 reads rope_parameters, older
            # versions rope_theta + rope_scaling (None when unscaled).
            "rope_parameters": rope_parameters, "rope_theta": cfg.rope_theta,
            "rope_scaling": None if cfg.rope_scaling == "none" else
            {k: v for k, v in rope_parameters.items() if k != "rope_theta"},
        }
        if family == "llama":
            hf_cfg.update(attention_bias=attn_bias, mlp_bias=mlp_bias, pretraining_tp=1)
        elif family == "qwen3":
            hf_cfg.update(attention_bias=attn_bias, use_sliding_window=False, sliding_window=None)
        else:
            hf_cfg.update(use_sliding_window=False, sliding_window=None)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = c(st["lm_head.weight"])
    hf_cfg["tie_word_embeddings"] = cfg.tie_embeddings
    hf_cfg["dtype"] = dtype_name
    hf_cfg["torch_dtype"] = dtype_name  # transformers < 5
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        hf_cfg[key] = special_ids.get(key)
    return hf_cfg, out


# ==================================================================================================
# Generation settings


def generation_from_hf(gen: dict) -> dict:
    """lmforge generation settings (GenerateConfig field names) from a generation_config.json dict."""
    out: dict[str, Any] = {}
    if gen.get("max_new_tokens") is not None:
        out["max_new_tokens"] = int(gen["max_new_tokens"])
    if gen.get("do_sample", False):
        out["temperature"] = float(gen.get("temperature", 1.0) if gen.get("temperature") is not None else 1.0)
        out["top_k"] = int(gen.get("top_k", 50) if gen.get("top_k") is not None else 0)
        out["top_p"] = float(gen.get("top_p", 1.0) if gen.get("top_p") is not None else 1.0)
    else:
        out["temperature"] = 0.0
    if gen.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(gen["repetition_penalty"])
    return out


def generation_to_hf(gen: Optional[dict], special_ids: dict) -> dict:
    out: dict[str, Any] = {k: v for k, v in special_ids.items() if v is not None}
    gen = gen or {}
    temperature = gen.get("temperature")
    if temperature is not None:
        if float(temperature) == 0.0:
            out["do_sample"] = False
        else:
            out.update(do_sample=True, temperature=float(temperature), top_k=int(gen.get("top_k", 0) or 0),
                       top_p=float(gen.get("top_p", 1.0)))
    if gen.get("repetition_penalty") not in (None, 1.0):
        out["repetition_penalty"] = float(gen["repetition_penalty"])
    if gen.get("max_new_tokens") is not None:
        out["max_new_tokens"] = int(gen["max_new_tokens"])
    return out


# ==================================================================================================
# Directories


class _LazyWeights(Mapping):
    """name -> tensor over the weight files of an HF directory, each tensor read when asked for."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.where: dict[str, Path] = {}
        self._st_handles: dict[Path, Any] = {}
        self._bin: dict[Path, dict] = {}
        d = directory
        if (d / "model.safetensors").is_file():
            self._add_safetensors(d / "model.safetensors")
        elif (d / "model.safetensors.index.json").is_file():
            for f in sorted(set(self._index(d / "model.safetensors.index.json").values())):
                self._add_safetensors(d / f)
        elif (d / "pytorch_model.bin").is_file():
            self._add_bin(d / "pytorch_model.bin")
        elif (d / "pytorch_model.bin.index.json").is_file():
            for f in sorted(set(self._index(d / "pytorch_model.bin.index.json").values())):
                self._add_bin(d / f)
        else:
            raise UserError(f"Hugging Face model {d}: no weights found (model.safetensors, "
                            f"model.safetensors.index.json or pytorch_model.bin)")

    @staticmethod
    def _index(path: Path) -> dict:
        try:
            return json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, OSError) as e:
            raise UserError(f"Hugging Face model: unreadable shard index {path} ({e})") from None

    def _add_safetensors(self, path: Path) -> None:
        from safetensors import safe_open

        if not path.is_file():
            raise UserError(f"Hugging Face model: shard {path} listed in the index is missing")
        try:
            h = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"Hugging Face model: cannot read {path} ({e})") from None
        self._st_handles[path] = h
        for k in h.keys():
            self.where[k] = path

    def _add_bin(self, path: Path) -> None:
        import torch

        if not path.is_file():
            raise UserError(f"Hugging Face model: shard {path} listed in the index is missing")
        try:
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"Hugging Face model: cannot read {path} ({str(e).splitlines()[0]})") from None
        self._bin[path] = sd
        for k in sd:
            self.where[k] = path

    def __getitem__(self, name: str):
        path = self.where[name]
        if path in self._st_handles:
            return self._st_handles[path].get_tensor(name)
        return self._bin[path][name].clone()  # off the memory map: the model may be trained in place

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, name: object) -> bool:
        return name in self.where


def read_hf_config(directory: str | Path) -> dict:
    p = Path(directory) / "config.json"
    if not p.is_file():
        raise UserError(f"Hugging Face model {directory}: config.json is missing")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"Hugging Face model {directory}: config.json is not valid JSON ({e})") from None


def load_state_assign(model, state: dict, where: str) -> None:
    """Put ``state`` into a meta-device ``model`` without copying (the tensors become the parameters)."""
    from ..checkpoint import load_state_into

    load_state_into(model, state, where, assign=True)
    model.reinit_buffers()
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight


def build_from_state(cfg: ModelConfig, state: dict, *, device="cpu", dtype=None, where: str = "model"):
    import torch

    from ..models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    load_state_assign(model, state, where)
    if dtype is not None or str(device) != "cpu":
        model = model.to(device=device, dtype=dtype)
        model.reinit_buffers()  # keep the RoPE frequencies in fp32 when the weights are cast down
    model.eval()
    return model


def _load_tokenizer(directory: Path):
    from ..tokenizer import Tokenizer

    if (directory / "tokenizer.json").is_file():
        return Tokenizer.load(directory)
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        # Older GPT-2 style directories: build the tokenizer.json they imply (byte-level BPE).
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        bpe = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        with tempfile.TemporaryDirectory() as tmp:
            tok.save(str(Path(tmp) / "tokenizer.json"))
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                if (directory / name).is_file():
                    (Path(tmp) / name).write_bytes((directory / name).read_bytes())
            return Tokenizer.load(tmp)
    return None


def load_hf(directory: str | Path, device: str = "cpu", dtype=None):
    """(DecoderLM, Tokenizer | None) from a Hugging Face model directory (config.json + model.safetensors,
    sharded safetensors with an index, or pytorch_model.bin). ``dtype=None`` keeps the stored dtype."""
    d = Path(directory)
    hf_cfg = read_hf_config(d)
    cfg = config_from_hf(hf_cfg)
    weights = _LazyWeights(d)
    state = state_from_hf(hf_cfg, weights, dtype=dtype)
    del weights
    model = build_from_state(cfg, state, device=device, dtype=dtype, where=f"Hugging Face model {d}")
    del state
    return model, _load_tokenizer(d)


def _read_generation(directory: Path) -> Optional[dict]:
    p = directory / "generation_config.json"
    if not p.is_file():
        return None
    try:
        return generation_from_hf(json.loads(p.read_text(encoding="utf-8")))
    except ValueError:
        warnings.warn(f"ignoring unreadable {p}")
        return None


def import_hf(src: str | Path, out: str | Path) -> Path:
    """Convert a Hugging Face model directory into an lmforge checkpoint directory ``out``."""
    from ..checkpoint import save_checkpoint

    src = Path(src)
    if not src.is_dir():
        raise UserError(f"Hugging Face model directory not found: {src}")
    model, tokenizer = load_hf(src)
    extra = {"imported_from": {"format": "hf", "path": str(src.resolve()),
                        "model_type": read_hf_config(src).get("model_type")}}
    return save_checkpoint(out, model, tokenizer=tokenizer, generation=_read_generation(src), extra=extra)


# ==================================================================================================
# Export


def _special_ids(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    return {"bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": getattr(tokenizer, "eos_id", None),
            "pad_token_id": getattr(tokenizer, "pad_id", None)}


def export_hf(model, tokenizer, out: str | Path, generation: Optional[dict] = None) -> Path:
    """Write a transformers model directory (model.safetensors, config.json, tokenizer files,
    generation_config.json) that ``AutoModelForCausalLM.from_pretrained(out)`` loads without remote code.
    Everything is validated before anything is written; the directory appears atomically."""
    from safetensors.torch import save_file

    from ..checkpoint import atomic_dir, clean_state_dict, unwrap

    module = unwrap(model)
    cfg: ModelConfig = module.cfg
    hf_family(cfg)  # refuse early, before any tensor is copied
    ids = _special_ids(tokenizer)
    if tokenizer is not None and getattr(tokenizer, "vocab_size", 0) > cfg.vocab_size:
        raise UserError(f"cannot export: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{cfg.vocab_size} embedding rows")
    hf_cfg, hf_state = state_to_hf(cfg, clean_state_dict(module), special_ids=ids)
    gen_cfg = generation_to_hf(generation, ids)

    def write(tmp: Path) -> None:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2), encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)

    return atomic_dir(Path(out), write)


def export_hf_path(model_path: str | Path, out: str | Path, generation: Optional[dict] = None) -> Path:
    """Export any model path (CKPT, RUN or HF directory) to a transformers directory."""
    from ..checkpoint import load_checkpoint

    model, tokenizer, meta = load_checkpoint(model_path)
    if generation is None:
        generation = meta.get("generation")
    return export_hf(model, tokenizer, out, generation=generation)
