"""`lmforge prepare`: tokenize a corpus into token shards (see ``shards.py`` for the format).

The corpus streams through: pieces of about 1 MB go to a pool of tokenizer processes (order preserved,
a bounded number in flight, so memory stays flat for any corpus size) and the ids are appended to part
files of ``shard_tokens`` tokens. Every document ends with the eos token. Only at the end, when the total is
known, is the stream cut into train (the head) and validation (the last ``val_fraction`` of the tokens):
whole parts are renamed, and the one part holding the cut is split in two.

Everything is written into ``<out>.tmp-XXXX`` next to ``out``, fsynced, and renamed to ``out`` only after
success (an older dataset in ``out`` is replaced then), so an interrupted run never leaves data that a
later step would read as valid: a temp directory has no meta.json until just before its rename.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..config import PrepareConfig, UserError
from ..fsutil import atomic_write_text, fsync_dir
from ..tokenizer import Tokenizer
from .corpus import DEFAULT_CHUNK_BYTES, Piece, iter_pieces, list_sources, split_text, total_bytes
from .shards import DATA_ALIGN, DTYPES, FORMAT, VERSION, dtype_for_vocab, encode_header

# Below this input size a process pool costs more (start-up) than it saves.
POOL_MIN_BYTES = 4 << 20
# Texts handed to the tokenizer in one batch are cut to about this many characters; the Rust encoder is
# faster on many medium strings than on one huge one.
ENCODE_PIECE_CHARS = 16 << 10

Item = list[tuple[str, bool]]  # (text, ends a document)


def prepare(cfg: PrepareConfig, progress: bool = True, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            pool_min_bytes: int = POOL_MIN_BYTES) -> dict:
    """Tokenize ``cfg.input`` into shards in ``cfg.out``; return meta.json's contents plus run ``stats``."""
    cfg.validate()
    tok = Tokenizer.load(cfg.tokenizer)
    if tok.eos_id is None:
        raise UserError(f"the tokenizer in {cfg.tokenizer} has no end-of-text (eos) token; prepare needs one to "
                        f"separate documents")
    files = list_sources(cfg.input)
    out = Path(os.path.abspath(cfg.out))  # normalized, so "." and "x/.." have a real name and parent
    _check_out(out, files)
    dtype_name = dtype_for_vocab(tok.vocab_size)
    dtype = DTYPES[dtype_name]
    nbytes = total_bytes(files)
    workers = cfg.workers or os.cpu_count() or 1
    if nbytes < pool_min_bytes:
        workers = 1
    header_base = {"dtype": dtype_name, "vocab_size": tok.vocab_size, "tokenizer_hash": tok.hash}

    tmp = _make_tmp(out)
    t0 = time.perf_counter()
    writer = None
    try:
        writer = _PartWriter(tmp, dtype, cfg.shard_tokens)
        with _progress_bar(nbytes, f"prepare {out.name}", progress) as bar:
            items = _group(iter_pieces(cfg.input, text_field=cfg.text_field, errors=cfg.errors,
                                       chunk_bytes=chunk_bytes), chunk_bytes)
            # closing(): stop the worker pool at once if writing fails.
            with contextlib.closing(_tokenize(items, tok, workers, dtype)) as results:
                for tokens, ends, consumed in results:
                    writer.write(tokens, ends)
                    bar.update(consumed)
                    bar.set_postfix_str(f"{writer.total:,} tokens", refresh=False)
            bar.update(max(0, bar.total - bar.n))
        writer.close()
        seconds = time.perf_counter() - t0
        n_train = int(writer.total * (1.0 - cfg.val_fraction)) if cfg.val_fraction > 0 else writer.total
        splits = _split(tmp, writer, n_train, header_base)
        meta = {
            "format": FORMAT, "version": VERSION, "dtype": dtype_name, "vocab_size": tok.vocab_size,
            "tokenizer_hash": tok.hash, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
            "splits": splits, "sources": [str(p) for p in cfg.input], "num_files": len(files),
            "val_fraction": cfg.val_fraction, "text_field": cfg.text_field, "tokenizer": "tokenizer.json",
        }
        tok.save(tmp)
        (tmp / _OWNER_FILE).unlink()
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: marks the data valid
        fsync_dir(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats = {"input_bytes": nbytes, "seconds": seconds, "mb_per_s": nbytes / 1e6 / max(seconds, 1e-9),
             "tokens": writer.total, "documents": writer.documents, "workers": workers}
    return {**meta, "stats": stats}


# --------------------------------------------------------------------------------------------------
# Output directory handling


def _check_out(out: Path, files: list[Path]) -> None:
    """Refuse an ``out`` we must not replace: a file, or a non-empty directory that is not prepared data."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} exists and is not a directory; choose another output directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            fmt = json.loads((out / "meta.json").read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        if fmt != FORMAT:
            raise UserError(f"--out {out} exists, is not empty and holds no prepared data (no lmforge meta.json); "
                            f"choose a new or empty directory")
        root = out.resolve()
        for f in files:
            if root in f.resolve().parents:
                raise UserError(f"input {f} is inside --out {out}, which prepare replaces; move it out first")


def _make_tmp(out: Path) -> Path:
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output directory {parent}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent} (permission denied); choose another --out")
    _remove_stale_tmps(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=parent))
        (tmp / _OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    except OSError as e:
        raise UserError(f"cannot write to {parent}: {e.strerror or e}; choose another --out") from None
    return tmp


_OWNER_FILE = ".prepare-owner"


def _remove_stale_tmps(out: Path) -> None:
    """Delete temp dirs of earlier prepare runs into ``out`` that were killed (their process is gone)."""
    host = socket.gethostname()
    for d in out.parent.glob(f"{glob.escape(out.name)}.tmp-*"):
        try:
            owner_host, pid = (d / _OWNER_FILE).read_text().split()
            if owner_host != host:
                continue  # another machine's run (shared file system): not ours to judge
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            continue


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and deleted after."""
    try:
        if not out.exists():
            os.rename(tmp, out)
            fsync_dir(out.parent)
            return
        old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old / out.name, out)  # put the previous dataset back
            old.rmdir()
            raise
    except OSError as e:
        raise UserError(f"cannot move the prepared data into {out}: {e.strerror or e}") from None
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, disable=not enabled,
                mininterval=0.5, smoothing=0.1, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# Tokenization (in-process or in a pool of worker processes)


def _group(pieces: Iterable[Piece], chunk_bytes: int) -> Iterator[tuple[Item, int]]:
    """Batch small documents into work items of about ``chunk_bytes`` characters: (item, input bytes)."""
    item: Item = []
    size = consumed = 0
    for p in pieces:
        item.append((p.text, p.end))
        size += len(p.text)
        consumed += p.nbytes
        if size >= chunk_bytes:
            yield item, consumed
            item, size, consumed = [], 0, 0
    if item:
        yield item, consumed


def encode_item(tok: Tokenizer, item: Item, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a work item with eos after each document end; also the eos positions in the item."""
    texts: list[str] = []
    owner: list[int] = []  # which item entry each text comes from
    for k, (text, _) in enumerate(item):
        for part in (split_text(text, ENCODE_PIECE_CHARS) if len(text) > ENCODE_PIECE_CHARS else [text]):
            texts.append(part)
            owner.append(k)
    arrays = tok._encode_arrays(texts) if texts else []
    eos = np.array([tok.eos_id], dtype=np.int64)
    chunks: list[np.ndarray] = []
    ends: list[int] = []
    pos = 0
    j = 0
    for k, (_, end) in enumerate(item):
        while j < len(arrays) and owner[j] == k:
            chunks.append(arrays[j])
            pos += len(arrays[j])
            j += 1
        if end:
            chunks.append(eos)
            ends.append(pos)
            pos += 1
    tokens = np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype=dtype)
    return tokens, np.asarray(ends, dtype=np.int64)


_worker_state: dict = {}


def _worker_init(tok: Tokenizer, dtype_str: str) -> None:
    # One tokenizer thread per process: the pool already uses every core, extra threads would fight.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C is handled by the parent (it stops the pool and cleans up); workers need not print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_state["tok"] = tok
    _worker_state["dtype"] = np.dtype(dtype_str)


def _worker_encode(item: Item) -> tuple[np.ndarray, np.ndarray]:
    return encode_item(_worker_state["tok"], item, _worker_state["dtype"])


def _tokenize(items: Iterable[tuple[Item, int]], tok: Tokenizer, workers: int,
              dtype: np.dtype) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yield (tokens, eos positions, input bytes) per item, in input order."""
    if workers <= 1:
        for item, consumed in items:
            yield (*encode_item(tok, item, dtype), consumed)
        return
    import multiprocessing as mp

    # fork where it is safe and cheap (Linux): spawn would re-run the caller's __main__ in every worker,
    # which breaks scripts without an `if __name__ == "__main__"` guard, notebooks and `python -`.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    # Children inherit this; it keeps each worker's tokenizer single-threaded and silences the
    # tokenizers "process just got forked" warning.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ctx.Pool(workers, initializer=_worker_init, initargs=(tok, dtype.str))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        # A bounded window of work in flight (Pool.imap would read the whole corpus ahead into memory).
        window: collections.deque = collections.deque()
        for item, consumed in items:
            window.append((pool.apply_async(_worker_encode, (item,)), consumed))
            if len(window) >= 2 * workers + 2:
                res, c = window.popleft()
                yield (*res.get(), c)
        while window:
            res, c = window.popleft()
            yield (*res.get(), c)


# --------------------------------------------------------------------------------------------------
# Writing parts and cutting them into splits


class _PartWriter:
    """Appends the token stream to part files of ``shard_tokens`` tokens each (headers written later)."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.dir = directory
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.parts: list[tuple[Path, int, int]] = []  # (path, first token, number of tokens)
        self.total = 0
        self.documents = 0
        self._f = None
        self._ends_path = directory / "doc_ends.i64"  # eos position of every document, for per-split counts
        self._ends = open(self._ends_path, "wb")

    def write(self, tokens: np.ndarray, ends: np.ndarray) -> None:
        self._ends.write((ends + self.total).astype("<i8").tobytes())
        self.documents += len(ends)
        pos = 0
        while pos < len(tokens):
            if self._f is None:
                path = self.dir / f"part-{len(self.parts):05d}.bin"
                self._f = open(path, "wb")
                self._f.write(b"\0" * DATA_ALIGN)  # header placeholder: zeros are no valid magic
                self.parts.append((path, self.total + pos, 0))
            path, start, n = self.parts[-1]
            take = min(len(tokens) - pos, self.shard_tokens - n)
            self._f.write(tokens[pos:pos + take].tobytes())
            self.parts[-1] = (path, start, n + take)
            pos += take
            if n + take == self.shard_tokens:
                self._close_part()
        self.total += len(tokens)

    def _close_part(self) -> None:
        self._f.close()
        self._f = None

    def close(self) -> None:
        if self._f is not None:
            self._close_part()
        self._ends.close()  # closing twice is harmless

    def doc_ends(self) -> np.ndarray:
        # Memory-mapped: a corpus of many small documents would make this list large.
        if not self.documents:
            return np.zeros(0, dtype=np.int64)
        return np.memmap(self._ends_path, dtype="<i8", mode="r", shape=(self.documents,))


def _split(tmp: Path, writer: _PartWriter, n_train: int, header_base: dict) -> dict:
    """Turn the parts into train-NNNNN.bin (tokens before ``n_train``) and val-NNNNN.bin shards."""
    ends = writer.doc_ends()
    item = writer.dtype.itemsize
    shards: dict[str, list[tuple[Path, int, int]]] = {"train": [], "val": []}

    def finish(path: Path, split: str, start: int, n: int) -> None:
        docs = int(np.searchsorted(ends, start + n) - np.searchsorted(ends, start))
        header = encode_header({**header_base, "num_tokens": n, "num_documents": docs})
        assert len(header) == DATA_ALIGN, "shard header grew past one page"
        with open(path, "r+b") as f:
            f.write(header)
            f.truncate(DATA_ALIGN + n * item)
            f.flush()
            os.fsync(f.fileno())
        final = tmp / f"{split}-{len(shards[split]):05d}.bin"
        os.rename(path, final)
        shards[split].append((final, n, docs))

    for path, start, n in writer.parts:
        if start + n <= n_train:
            finish(path, "train", start, n)
        elif start >= n_train:
            finish(path, "val", start, n)
        else:  # the cut falls inside this part: copy its tail to a new file, then keep the head
            head = n_train - start
            tail_path = tmp / "tail.bin"
            with open(path, "rb") as src, open(tail_path, "wb") as dst:
                dst.write(b"\0" * DATA_ALIGN)
                src.seek(DATA_ALIGN + head * item)
                shutil.copyfileobj(src, dst, 16 << 20)
            finish(path, "train", start, head)
            finish(tail_path, "val", n_train, n - head)
    ends = None  # release the memory map before deleting its file  # noqa: F841
    os.unlink(writer._ends_path)
    return {split: {"shards": [p.name for p, _, _ in lst], "tokens": sum(n for _, n, _ in lst),
                    "documents": sum(d for _, _, d in lst)} for split, lst in shards.items()}
