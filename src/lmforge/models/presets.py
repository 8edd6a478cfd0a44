"""Named model configurations. A preset is only a starting ModelConfig: every field can be overridden,
and nothing in lmforge behaves differently because of a preset's name.

Each preset documents its exact parameter count at its own vocabulary size (tests check it); a run
that takes its vocabulary from the data changes the embedding rows accordingly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    params: int
    """Exact parameter count (tied embeddings counted once)."""
    about: str


def _gpt2(**kw) -> ModelConfig:
    base = dict(pos="learned", norm="layernorm", mlp="gelu_tanh", bias=True, tie_embeddings=True, norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)


def _llama(**kw) -> ModelConfig:
    base = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, norm_eps=1e-5,
                rope_theta=10000.0)
    base.update(kw)
    return ModelConfig(**base)


def _transformer(**kw) -> ModelConfig:
    """The original encoder-decoder Transformer (Vaswani et al. 2017): sinusoidal positions, ReLU MLP,
    embeddings scaled by sqrt(d_model), one shared vocabulary with three-way tied embeddings."""
    base = dict(arch="seq2seq", pos="sinusoidal", norm="layernorm", mlp="relu", bias=True, tie_embeddings=True,
                scale_embeddings=True, norm_eps=1e-6, norm_position="post", dropout=0.1)
    base.update(kw)
    return ModelConfig(**base)


def _bert(**kw) -> ModelConfig:
    """BERT (Devlin et al. 2019): learned positions, 2 token types, embedding LayerNorm, post-norm, GELU."""
    base = dict(arch="encoder", pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True,
                norm_eps=1e-12, norm_position="post", type_vocab_size=2, embed_norm=True, head_bias=True,
                pooler=True, mlm_head=True, dropout=0.1)
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, Preset] = {
    "transformer-tiny": Preset(
        _transformer(vocab_size=8000, block_size=256, n_layers=3, n_heads=4, d_model=256, d_ff=1024,
                     norm_position="pre"),
        params=7_578_624,
        about="a small encoder-decoder for CPU (3+3 layers, 256 wide, 8k shared vocabulary); pre-norm, which "
              "trains at a high learning rate without a long warmup (Xiong et al. 2020)",
    ),
    "transformer-base": Preset(
        _transformer(vocab_size=37000, block_size=512, n_layers=6, n_heads=8, d_model=512, d_ff=2048),
        params=63_082_496,
        about="Transformer base (Vaswani et al. 2017): 6+6 post-norm layers, 512 wide, 8 heads, FFN 2048, "
              "37k shared BPE vocabulary (the paper's '65M')",
    ),
    "bert-tiny": Preset(
        _bert(vocab_size=8192, block_size=128, n_layers=4, n_heads=4, d_model=256, d_ff=1024, pooler=False),
        params=5_364_480,
        about="a small BERT-style encoder for masked-LM pretraining on CPU (4 layers, 256 wide, 128 context)",
    ),
    "bert-base": Preset(
        _bert(vocab_size=30522, block_size=512, n_layers=12, n_heads=12, d_model=768, d_ff=3072),
        params=110_104_890,
        about="BERT base (Devlin et al. 2019) with its pooler and masked-LM head (tied decoder)",
    ),
    "char-tiny": Preset(
        _gpt2(vocab_size=65, block_size=64, n_layers=4, n_heads=4, d_model=128, mlp="gelu", bias=False),
        params=804_096,
        about="nanoGPT's CPU Shakespeare config: GPT-2 style, 4 layers, 4 heads, 128 wide, 64 context",
    ),
    "gpt2-124m": Preset(
        _gpt2(vocab_size=50257, block_size=1024, n_layers=12, n_heads=12, d_model=768),
        params=124_439_808,
        about="GPT-2 small (Radford et al. 2019)",
    ),
    "llama-tiny": Preset(
        _llama(vocab_size=8192, block_size=256, n_layers=4, n_heads=4, n_kv_heads=2, d_model=128),
        params=2_884_736,
        about="a small Llama-style model for CPU experiments: RoPE, RMSNorm, SwiGLU, GQA (4 query / 2 KV heads)",
    ),
    "llama-160m": Preset(
        _llama(vocab_size=32000, block_size=2048, n_layers=12, n_heads=12, d_model=768, d_ff=3072),
        params=162_417_408,
        about="Llama architecture at 160M parameters (12 layers, 768 wide, 32k vocabulary, untied head)",
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return replace(PRESETS[name].config)
