"""Token shards: the on-disk format of prepared data, and ``TokenData`` to read a split.

A prepared data directory holds ``meta.json``, a copy of the tokenizer, and shard files
``train-00000.bin``, ``val-00000.bin``, ... Each shard is::

    b"LMFTOK01"                 8 bytes magic
    uint64 little-endian        header length H
    JSON header, H bytes        {dtype, vocab_size, tokenizer_hash, num_tokens, num_documents}, space padded
    tokens                      little-endian uint16 (vocab <= 65536) or uint32, from offset 16 + H

Writers pad the header so the tokens start at a 4096-byte boundary (page aligned for memory mapping);
readers take H from the file. A split is the concatenation of its shards in meta.json order.
"""
from __future__ import annotations

import bisect
import json
import struct
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import UserError

MAGIC = b"LMFTOK01"
DATA_ALIGN = 4096
FORMAT = "lmforge-tokens"
VERSION = 1
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def encode_header(header: dict) -> bytes:
    """Magic + length + JSON, padded with spaces so the tokens start at a multiple of DATA_ALIGN."""
    body = json.dumps(header, sort_keys=True).encode("utf-8")
    total = -(-(16 + len(body)) // DATA_ALIGN) * DATA_ALIGN
    body += b" " * (total - 16 - len(body))
    return MAGIC + struct.pack("<Q", len(body)) + body


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header, data offset) of a shard file; UserError if it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise UserError(f"{path} is not an lmforge token shard (bad magic); rerun `lmforge prepare`")
            (n,) = struct.unpack("<Q", head[8:])
            if n > 1 << 24:
                raise UserError(f"{path} has a corrupt header; rerun `lmforge prepare`")
            body = f.read(n)
    except OSError as e:
        raise UserError(f"cannot read shard {path}: {e.strerror or e}") from None
    try:
        header = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} has a corrupt header; rerun `lmforge prepare`") from None
    if len(body) < n or not isinstance(header, dict):
        raise UserError(f"{path} has a corrupt header; rerun `lmforge prepare`")
    return header, 16 + n


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared data directory, checked; UserError telling to run prepare if absent."""
    d = Path(data_dir)
    p = d / "meta.json"
    if not p.is_file():
        what = "does not exist" if not d.exists() else "has no meta.json"
        raise UserError(f"{d} {what}: it is not prepared data; run `lmforge prepare --input ... "
                        f"--tokenizer ... --out {d}` first")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p} is unreadable ({e}); rerun `lmforge prepare`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{p} is not lmforge prepared data (format must be {FORMAT!r}); run `lmforge prepare`")
    if meta.get("version") != VERSION:
        raise UserError(f"{p} has format version {meta.get('version')}, this lmforge reads version {VERSION}; "
                        f"rerun `lmforge prepare` or upgrade lmforge")
    for key in ("dtype", "vocab_size", "tokenizer_hash", "splits"):
        if key not in meta:
            raise UserError(f"{p} lacks {key!r}; rerun `lmforge prepare`")
    if meta["dtype"] not in DTYPES:
        raise UserError(f"{p}: unknown dtype {meta['dtype']!r}")
    return meta


class TokenData:
    """One split of prepared data as a single read-only token stream (memory-mapped shards)."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.data_dir = Path(data_dir)
        self.split = split
        meta = read_meta(self.data_dir)
        splits = meta["splits"]
        if split not in splits:
            raise UserError(f"{self.data_dir} has no {split!r} split (splits: {', '.join(splits)})")
        self.meta = meta
        self.dtype = DTYPES[meta["dtype"]]
        self.vocab_size: int = int(meta["vocab_size"])
        self.tokenizer_hash: str = meta["tokenizer_hash"]
        self.eos_id: Optional[int] = meta.get("eos_id")
        self.num_documents: int = int(splits[split].get("documents", 0))
        self.shards: list[Path] = [self.data_dir / name for name in splits[split].get("shards", [])]
        self._offsets: list[int] = []  # data offset of each shard
        self._starts: list[int] = [0]  # cumulative token counts
        for path in self.shards:
            header, offset = read_header(path)
            self._check(path, header, offset)
            self._offsets.append(offset)
            self._starts.append(self._starts[-1] + int(header["num_tokens"]))
        expected = splits[split].get("tokens")
        if expected is not None and expected != self._starts[-1]:
            raise UserError(f"{self.data_dir}: the {split} shards hold {self._starts[-1]} tokens but meta.json "
                            f"says {expected}; rerun `lmforge prepare`")
        self._maps: list[Optional[np.ndarray]] = [None] * len(self.shards)

    def _check(self, path: Path, header: dict, offset: int) -> None:
        for key in ("dtype", "vocab_size", "tokenizer_hash"):
            if header.get(key) != self.meta[key]:
                raise UserError(f"{path}: header {key}={header.get(key)!r} does not match meta.json "
                                f"({self.meta[key]!r}); the directory mixes datasets, rerun `lmforge prepare`")
        n = header.get("num_tokens")
        if not isinstance(n, int) or n < 0 or offset % self.dtype.itemsize:
            raise UserError(f"{path} has a corrupt header; rerun `lmforge prepare`")
        size = path.stat().st_size
        if size != offset + n * self.dtype.itemsize:
            raise UserError(f"{path} is truncated or corrupt ({size} bytes, expected "
                            f"{offset + n * self.dtype.itemsize}); rerun `lmforge prepare`")

    def _map(self, i: int) -> np.ndarray:
        m = self._maps[i]
        if m is None:
            n = self._starts[i + 1] - self._starts[i]
            if n == 0:
                m = np.zeros(0, dtype=self.dtype)
            else:
                m = np.memmap(self.shards[i], dtype=self.dtype, mode="r", offset=self._offsets[i], shape=(n,))
            self._maps[i] = m
        return m

    def __len__(self) -> int:
        return self._starts[-1]

    def get(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the split's stream (across shard boundaries as needed)."""
        if not 0 <= start <= end <= len(self):
            raise IndexError(f"token range [{start}, {end}) outside the {self.split} split of {len(self)} tokens")
        parts = []
        i = bisect.bisect_right(self._starts, start) - 1
        while start < end:
            s0, s1 = self._starts[i], self._starts[i + 1]
            stop = min(end, s1)
            if stop > start:
                parts.append(self._map(i)[start - s0:stop - s0])
            start = stop
            i += 1
        if len(parts) == 1:
            return np.asarray(parts[0])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("TokenData supports contiguous slices only, e.g. data[a:b]")
        start, stop, _ = item.indices(len(self))
        return self.get(start, max(start, stop))

    # Memory maps are reopened in the receiving process instead of being pickled as arrays.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = [None] * len(self.shards)
        return state

    def __repr__(self) -> str:
        return (f"TokenData({str(self.data_dir)!r}, split={self.split!r}, tokens={len(self)}, "
                f"shards={len(self.shards)})")
