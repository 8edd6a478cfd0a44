"""Data: corpus readers, ``prepare`` (corpus -> token shards), shard reading and pretraining batches.

Import from the submodules (``lmforge.data.prepare``, ``.shards``, ``.loader``, ``.corpus``, ``.corpora``).
Most names are also reachable here, loaded lazily so importing this package stays cheap (no torch); not
``prepare``, which is also the name of a submodule.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "iter_documents": "corpus", "iter_pieces": "corpus", "list_sources": "corpus", "read_text_chunks": "corpus",
    "TokenData": "shards", "read_meta": "shards",
    "BlockSampler": "loader", "ValBatches": "loader",
    "default_corpus": "corpora",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
