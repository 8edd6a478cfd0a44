"""Read a text corpus: plain text files, directories, JSON Lines and Parquet, as a stream of documents.

Order is deterministic: inputs in the order given, directories walked recursively in sorted path order.
A plain text file is one document; a .jsonl line or a Parquet row is one document. Big documents come
as several pieces (``iter_pieces``) so nothing ever holds a whole multi-GB file in memory; pieces are cut
at a line or word start (see ``split_point``), places where byte-level BPE's pre-tokenizer splits anyway,
so tokenizing the pieces gives the same ids as tokenizing the whole document.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ..config import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
DIR_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

DEFAULT_CHUNK_BYTES = 1 << 20

# Cut points where GPT-2 style pre-tokenizers always have a boundary: after a newline followed by a
# non-space character, and before a space followed by a non-space character (the start of " word").
_NEWLINE_CUT = re.compile(r"\n(?=\S)")
_SPACE_CUT = re.compile(r" (?=\S)")


@dataclass(frozen=True)
class Piece:
    """A piece of a document. ``end`` marks the document's last piece; ``nbytes`` is the input consumed
    (for progress bars)."""

    source: str
    text: str
    end: bool
    nbytes: int


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def list_sources(paths: Sequence[str | Path]) -> list[Path]:
    """Expand inputs into the ordered list of files to read. Missing paths are a UserError."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise UserError("no input given: pass at least one file or directory")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = []
            for root, dirs, names in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # skip .git, .ipynb_checkpoints, ...
                for n in names:
                    if not n.startswith(".") and n.lower().endswith(DIR_SUFFIXES):
                        found.append(Path(root) / n)
            if not found:
                raise UserError(f"directory {p} has no {'/'.join(DIR_SUFFIXES)} files")
            files.extend(sorted(found, key=lambda f: f.relative_to(p).parts))
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise UserError(f"input {p} is not a regular file or directory")
        else:
            raise UserError(f"input not found: {p}")
    return files


def total_bytes(files: Sequence[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def iter_pieces(paths: Sequence[str | Path], text_field: str = "text", errors: str = "strict",
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Piece]:
    """Yield the corpus as document pieces of about ``chunk_bytes`` (documents may be smaller).

    Empty documents are skipped. Raises UserError when nothing at all is left (``... is empty``).
    """
    if errors not in ("strict", "replace"):
        raise UserError(f"errors must be 'strict' or 'replace', got {errors!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = list_sources(paths)
    docs = 0
    for f in files:
        kind = _kind(f)
        if kind == "text":
            it = _iter_text_file(f, errors, chunk_bytes)
        elif kind == "jsonl":
            it = _iter_jsonl(f, text_field, errors, chunk_bytes)
        else:
            it = _iter_parquet(f, text_field, errors, chunk_bytes)
        for piece in it:
            docs += piece.end
            yield piece
    if docs == 0:
        names = ", ".join(map(str, paths[:3])) + (", ..." if len(paths) > 3 else "")
        what = str(files[0]) if len(files) == 1 else f"the input ({names}: {len(files)} files)"
        raise UserError(f"{what} is empty: no text found")


def iter_documents(paths: Sequence[str | Path], text_field: str = "text",
                   errors: str = "strict") -> Iterator[tuple[str, str]]:
    """Yield (source_name, text) for every non-empty document, in deterministic order."""
    parts: list[str] = []
    for piece in iter_pieces(paths, text_field=text_field, errors=errors):
        parts.append(piece.text)
        if piece.end:
            yield piece.source, "".join(parts)
            parts = []


# --------------------------------------------------------------------------------------------------
# Plain text


def _decode(data: bytes, errors: str, path: Path, offset: int, where: str = "") -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: invalid UTF-8{where} at byte offset {offset + e.start} ({e.reason}); fix the "
                        f"file or pass --errors replace to replace undecodable bytes with U+FFFD") from None


def _utf8_boundary(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 character."""
    n = len(data)
    i = n - 1
    while i >= 0 and n - i < 4 and (data[i] & 0xC0) == 0x80:  # walk back over continuation bytes
        i -= 1
    if i < 0:
        return n
    b = data[i]
    need = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
    return i if n - i < need else n


def _last_match(pattern: re.Pattern, text: str, end: int) -> Optional[re.Match]:
    """The last match of ``pattern`` in ``text[:end]``, searching backwards in growing windows."""
    width = 1 << 12
    while True:
        lo = max(0, end - width)
        last = None
        for last in pattern.finditer(text, lo, end):
            pass
        if last is not None or lo == 0:
            return last
        width <<= 2


def split_point(text: str, limit: int) -> int:
    """Where to cut ``text`` so the head has at most ``limit`` characters and tokenizes the same on its
    own, or 0 if there is no such place. Prefers a line start, else a word start."""
    end = min(len(text), limit + 1)  # +1: the lookahead must see the character after the cut
    nl = _last_match(_NEWLINE_CUT, text, end)
    cut = nl.end() if nl else 0
    if cut < end // 2:  # a line start far back would leave most of the text for later; try a word start
        sp = _last_match(_SPACE_CUT, text, end)
        if sp and sp.start() > cut:
            cut = sp.start()
    return cut


def split_text(text: str, limit: int) -> Iterator[str]:
    """Cut a long string into pieces of at most ``limit`` characters at tokenization-neutral places."""
    while len(text) > limit:
        cut = split_point(text, limit) or limit  # no neutral place at all: cut anyway
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def read_text_chunks(path: str | Path, errors: str = "strict",
                     chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[str, int]]:
    """Read a text file as (text, nbytes) chunks of about ``chunk_bytes``, without loading it whole.

    Chunks end at a line or word start (see ``split_point``), so they tokenize like the whole file.
    Invalid UTF-8 raises UserError naming the byte offset (``errors="strict"``) or becomes U+FFFD.
    """
    path = Path(path)
    limit = max(1, chunk_bytes)
    with open(path, "rb") as f:
        pending = b""  # an incomplete UTF-8 character at the end of the last block
        offset = 0  # file offset of the first byte of ``pending``
        carry = ""  # decoded text not yet emitted
        carry_bytes = 0
        first = True
        while True:
            block = f.read(limit)
            data = pending + block
            if block:
                cut = _utf8_boundary(data)
                data, pending = data[:cut], data[cut:]
            else:
                pending = b""
            text = _decode(data, errors, path, offset)
            if first:
                text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark is not content
                first = False
            offset += len(data)
            carry += text
            carry_bytes += len(data)
            if not block:
                break
            if len(carry) >= limit:
                cut = split_point(carry, len(carry))
                if cut == 0 and len(carry) >= 4 * limit:  # no neutral place in a long stretch: cut anyway
                    cut = limit
                if cut:
                    head, carry = carry[:cut], carry[cut:]
                    rest_bytes = len(carry.encode("utf-8", "surrogatepass"))
                    yield head, max(0, carry_bytes - rest_bytes)
                    carry_bytes = rest_bytes
        if carry or carry_bytes:
            yield carry, carry_bytes


def _iter_text_file(path: Path, errors: str, chunk_bytes: int) -> Iterator[Piece]:
    src = str(path)
    prev: Optional[tuple[str, int]] = None
    emitted = False
    for chunk in read_text_chunks(path, errors, chunk_bytes):
        if prev is not None:
            yield Piece(src, prev[0], False, prev[1])
            emitted = True
        prev = chunk
    # An empty file (or one holding only a byte order mark) is no document.
    if prev is not None and (prev[0] or emitted):
        yield Piece(src, prev[0], True, prev[1])


# --------------------------------------------------------------------------------------------------
# JSON Lines and Parquet


def _doc_pieces(src: str, text: str, nbytes: int, chunk_bytes: int) -> Iterator[Piece]:
    parts = list(split_text(text, chunk_bytes)) if len(text) > chunk_bytes else [text]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        yield Piece(src, part, last, nbytes if last else 0)


def _iter_jsonl(path: Path, field: str, errors: str, chunk_bytes: int) -> Iterator[Piece]:
    src = str(path)
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            line = _decode(raw, errors, path, start, f" on line {lineno}")
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}: line {lineno} is not a JSON object")
            if field not in obj:
                keys = ", ".join(map(str, list(obj)[:10])) or "none"
                raise UserError(f"{path}: line {lineno} has no field {field!r} (fields: {keys}); "
                                f"choose the text field with --text-field")
            text = obj[field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise UserError(f"{path}: line {lineno}: field {field!r} is a {type(text).__name__}, not a string")
            if text:
                yield from _doc_pieces(src, text, len(raw), chunk_bytes)


def _iter_parquet(path: Path, field: str, errors: str, chunk_bytes: int) -> Iterator[Piece]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    src = str(path)
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{path} is not a readable Parquet file: {e}") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(f"{path} has no column {field!r} (columns: {', '.join(names)}); "
                        f"choose the text column with --text-field")
    ftype = pf.schema_arrow.field(field).type
    is_binary = pa.types.is_binary(ftype) or pa.types.is_large_binary(ftype)
    if not (is_binary or pa.types.is_string(ftype) or pa.types.is_large_string(ftype)
            or str(ftype) == "string_view"):
        raise UserError(f"{path}: column {field!r} has type {ftype}, not text")
    size = path.stat().st_size
    rows_total = max(1, pf.metadata.num_rows)
    row = 0
    # Row-group sized batches: only one batch of the column is in memory at a time.
    for batch in pf.iter_batches(batch_size=4096, columns=[field]):
        values = batch.column(0).to_pylist()
        batch_bytes = size * len(values) // rows_total  # progress: share of the file
        for i, v in enumerate(values):
            if v is None:
                continue
            if is_binary:
                try:
                    v = v.decode("utf-8", errors=errors)
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}: row {row + i} of column {field!r} is not valid UTF-8 (byte offset "
                                    f"{e.start} in the value); pass --errors replace to replace it") from None
            if v:
                yield from _doc_pieces(src, v, batch_bytes // len(values), chunk_bytes)
        row += len(values)
