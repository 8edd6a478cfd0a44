"""Model families. ``build_model`` turns a ModelConfig into its module."""
from __future__ import annotations

from ..config import ModelConfig


def build_model(cfg: ModelConfig):
    if cfg.arch == "decoder":
        from .decoder import DecoderLM

        return DecoderLM(cfg)
    if cfg.arch == "seq2seq":
        from .seq2seq import Seq2SeqModel

        return Seq2SeqModel(cfg)
    if cfg.arch == "encoder":
        from .encoder import EncoderModel

        return EncoderModel(cfg)
    raise ValueError(f"unknown model arch {cfg.arch!r}")
