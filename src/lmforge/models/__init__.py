"""Model families. ``build_model`` turns a ModelConfig into its module."""
from __future__ import annotations

from ..config import ModelConfig


def replace_module(model, name: str, new) -> None:
    """Put ``new`` in place of the submodule called ``name`` (dotted, as ``named_modules`` gives it)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
