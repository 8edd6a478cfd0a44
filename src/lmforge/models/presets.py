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


PRESETS: dict[str, Preset] = {
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
