"""lmforge: build Transformer language models end to end.

    from lmforge import LM
    lm = LM.load("runs/shakespeare")
    print(lm.generate("ROMEO:", max_new_tokens=100))

Nothing heavy is imported here: ``import lmforge`` does not import torch. The public names below are
resolved on first use (PEP 562 module ``__getattr__``).
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "LM": "lmforge.lm",
    "GenerationResult": "lmforge.generate",
    "ConfigError": "lmforge.config",
    "UserError": "lmforge.config",
    "ModelConfig": "lmforge.config",
    "TokenizerConfig": "lmforge.config",
    "PrepareConfig": "lmforge.config",
    "DataConfig": "lmforge.config",
    "OptimConfig": "lmforge.config",
    "TrainConfig": "lmforge.config",
    "PretrainConfig": "lmforge.config",
    "GenerateConfig": "lmforge.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None and name.endswith("Config") and not name.startswith("_"):
        module = "lmforge.config"  # config classes added later (LoRA, serving, ...) resolve too
    if module is None:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    import importlib

    try:
        value = getattr(importlib.import_module(module), name)
    except AttributeError:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}") from None
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
