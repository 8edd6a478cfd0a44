"""Tokenizer: training, save/load, Hugging Face compatibility, chat templates, streaming decode."""
from __future__ import annotations

import json
import pickle

import pytest

from lmforge.config import ConfigError, TokenizerConfig, UserError
from lmforge.tokenizer import DEFAULT_CHAT_TEMPLATE, SPECIAL_TOKENS, StreamDecoder, Tokenizer

MIXED = "Hello, world!  The model says:\n\n  你好世界 🤖🎉\r\ndef f(x):\n\treturn x**2\n  trailing  "
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi 👋"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "again"},
]


@pytest.fixture(scope="module")
def bpe(shakespeare_text, tmp_path_factory) -> Tokenizer:
    tok = Tokenizer.train_from_iterator([shakespeare_text[:300_000]], kind="bpe", vocab_size=600)
    d = tmp_path_factory.mktemp("bpe")
    tok.save(d)
    return Tokenizer.load(d)


@pytest.fixture(scope="module")
def char(shakespeare_text) -> Tokenizer:
    return Tokenizer.train_from_iterator([shakespeare_text[:100_000]], kind="char")


# --------------------------------------------------------------------------------------------------
# Training and save/load


def test_bpe_special_tokens_vocab_and_roundtrip(bpe, tmp_path):
    assert [bpe.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (bpe.eos_id, bpe.bos_id, bpe.pad_id, bpe.unk_id) == (0, 1, 2, None)
    assert bpe.vocab_size == 600  # special tokens included
    assert bpe.kind == "bpe"
    assert bpe.stop_ids == [0, 4]
    # Any text round-trips, including scripts and emoji never seen in training.
    for s in [MIXED, "日本語のテキスト", "🤖" * 5, "", " ", "\x00\x01 control", "e\u0301 combining"]:
        assert bpe.decode(bpe.encode(s)) == s
    bpe.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.hash == bpe.hash and len(bpe.hash) == 64
    assert again.encode(MIXED) == bpe.encode(MIXED)
    assert again.chat_template == DEFAULT_CHAT_TEMPLATE


def test_bpe_training_is_deterministic(shakespeare_text):
    a = Tokenizer.train_from_iterator([shakespeare_text[:50_000]], kind="bpe", vocab_size=400)
    b = Tokenizer.train_from_iterator([shakespeare_text[:50_000]], kind="bpe", vocab_size=400)
    assert a.hash == b.hash
    c = Tokenizer.train_from_iterator([shakespeare_text[:50_000]], kind="bpe", vocab_size=401)
    assert c.hash != a.hash


def test_encode_bos_eos_and_batch(bpe):
    ids = bpe.encode("To be, or not to be")
    assert bpe.encode("To be, or not to be", add_bos=True, add_eos=True) == [bpe.bos_id, *ids, bpe.eos_id]
    assert bpe.encode_batch(["To be, or not to be", "", MIXED]) == [ids, [], bpe.encode(MIXED)]
    # Special token strings in the text are recognised (needed for chat prompts).
    assert bpe.encode("a<|im_end|>b") == [*bpe.encode("a"), 4, *bpe.encode("b")]
    assert bpe.decode(bpe.encode("a<|im_end|>b"), skip_special_tokens=True) == "ab"
    assert bpe.id_to_token(0) == "<|endoftext|>"


def test_char_tokenizer(char, tmp_path):
    assert [char.token_to_id(t) for t in SPECIAL_TOKENS] + [char.token_to_id("<|unk|>")] == [0, 1, 2, 3, 4, 5]
    assert char.unk_id == 5 and char.kind == "char"
    s = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:  Speak, speak.\n"
    ids = char.encode(s)
    assert len(ids) == len(s)  # one token per character, spaces and newlines included
    assert char.decode(ids) == s  # no spaces added between tokens
    assert char.encode("A\u4e16") == [char.token_to_id("A"), 5]  # unseen character -> unk
    # Characters come in code point order after the special tokens (like nanoGPT's sorted(set(text))).
    assert char.token_to_id("\n") == 6 and char.token_to_id(" ") == 7
    char.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.kind == "char" and again.hash == char.hash and again.encode(s) == ids


def test_char_fast_path_matches_tokenizers_pipeline(char):
    texts = ["plain text\n  with spaces ", "unseen ✓ chars 你好", "special <|endoftext|> inside", "", "a<|unk|>b",
             "lone \ud800 surrogate"]
    for t in texts:
        pipeline = char._tok.encode(t.replace("\ud800", "\ufffd"), add_special_tokens=False).ids
        assert char.encode(t) == pipeline, t


def test_bpe_unit_cache_gives_the_pipelines_ids(shakespeare_text):
    # Random strings over characters that stress the pre-tokenizer (every kind of whitespace, U+001C which
    # Python calls whitespace and the tokenizers regex does not, contractions, digits, non-ASCII letters),
    # with a vocabulary trained on such strings so that merges cross all of them.
    import random

    rng = random.Random(0)
    alphabet = list(" \n\t\r\x0b\x0c\x85\xa0\u2003\u3000\x1c\x1f'sdtlmvreA1!.,-é中😀")
    alphabet += ["  ", "'s", "'ll", " the", "!\x1c.", "\u3000 "]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    tok = Tokenizer.train_from_iterator(texts, kind="bpe", vocab_size=700)
    assert tok._unit_encoder() is not None
    tok._units.MAX_NEW = 1.0  # these strings rarely repeat a unit: keep the cache on anyway
    texts += [MIXED, "special <|endoftext|> inside", "<|im_start|>user\nhi<|im_end|>", "lone \ud800 surrogate",
              shakespeare_text[:20_000], "", " ", "x"]
    fast = [a.tolist() for a in tok._encode_arrays(texts)]  # one batch: units shared across texts
    again = [a.tolist() for a in tok._encode_arrays(texts[::-1])][::-1]  # now from the cache
    pipeline = [e.ids for e in tok._tok.encode_batch([t.replace("\ud800", "\ufffd") for t in texts],
                                                      add_special_tokens=False)]
    assert fast == pipeline and again == pipeline
    tok._units.max_units = 50  # a full cache is cleared and refilled
    assert [a.tolist() for a in tok._encode_arrays(texts)] == pipeline


def test_unit_cache_steps_aside_for_text_that_does_not_repeat(bpe):
    import random

    rng = random.Random(1)
    words = lambda n: " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8)) for _ in range(n))
    units = bpe._unit_encoder()
    units._skip, units._cache = 0, {}
    texts = [words(200) for _ in range(4)]
    pipeline = [e.ids for e in bpe._tok.encode_batch(texts, add_special_tokens=False)]
    assert [a.tolist() for a in bpe._encode_arrays(texts)] == pipeline
    assert units._skip == units.SKIP_CALLS  # every unit was new
    cached = len(units._cache)
    for _ in range(units.SKIP_CALLS):
        assert [a.tolist() for a in bpe._encode_arrays(texts[::-1])] == pipeline[::-1]
    assert units._skip == 0 and len(units._cache) == cached  # the plain pipeline did those
    bpe._encode_arrays(texts)  # a look again: every unit is cached now
    assert units._skip == 0


def test_unit_split_whitespace_is_the_pre_tokenizers_for_every_code_point():
    import re

    from tokenizers import pre_tokenizers

    from lmforge.tokenizer import _WS

    # In "a" c c "a" the second c starts a piece of the GPT-2 regex exactly when c is whitespace to it
    # (letters join the a's, other symbols and digits make one "cc" piece).
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str("".join(f"a{chr(c) * 2}a" for c in cps))
    starts = {start for _, (start, _) in pieces}
    library = {c for i, c in enumerate(cps) if 4 * i + 2 in starts}
    ours = {c for c in cps if re.fullmatch(f"[{_WS}]", chr(c))}
    assert library == ours and ord(" ") in ours and 0x1C not in ours


def test_unit_cache_is_off_where_units_would_change_the_ids(bpe):
    from tokenizers import Tokenizer as HFTokenizer, normalizers, pre_tokenizers

    assert bpe._unit_encoder() is not None
    data = json.loads(bpe._tok.to_str())
    for change in ("prefix", "normalizer", "sequence"):
        tok = HFTokenizer.from_str(json.dumps(data))
        if change == "prefix":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        elif change == "normalizer":
            tok.normalizer = normalizers.Lowercase()
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
        other = Tokenizer(tok)
        assert other._unit_encoder() is None, change
        assert other.encode(MIXED + " 12345") == tok.encode(MIXED + " 12345", add_special_tokens=False).ids


def test_pickle_roundtrip(bpe):
    again = pickle.loads(pickle.dumps(bpe))
    assert again.hash == bpe.hash and again.encode(MIXED) == bpe.encode(MIXED)
    assert again.chat_template == bpe.chat_template


def test_train_from_config_reads_jsonl(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": f"line {i} héllo"}) + "\n" for i in range(50)))
    cfg = TokenizerConfig(input=[str(tmp_path / "c.jsonl")], kind="char", text_field="body", out=str(tmp_path / "t"))
    tok = Tokenizer.train(cfg, progress=False)
    assert tok.decode(tok.encode("héllo 42")) == "héllo 42"
    assert not (tmp_path / "t").exists()  # train() does not save
    assert tok.save(cfg.out) == tmp_path / "t"


# --------------------------------------------------------------------------------------------------
# Errors


def test_vocab_size_too_small():
    with pytest.raises(ConfigError, match="vocab_size"):
        Tokenizer.train_from_iterator(["some text"], kind="bpe", vocab_size=200)
    with pytest.raises(ConfigError, match="vocab_size"):
        TokenizerConfig(input=["x"], vocab_size=100).validate()


def test_empty_corpus(tmp_path):
    with pytest.raises(UserError, match="empty"):
        Tokenizer.train_from_iterator(["", ""], kind="bpe", vocab_size=300)
    with pytest.raises(UserError, match="empty"):
        Tokenizer.train_from_iterator([], kind="char")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        Tokenizer.train(TokenizerConfig(input=[str(tmp_path / "empty.txt")], vocab_size=300), progress=False)


def test_bad_utf8_during_training_is_a_user_error(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text\n" * 10 + b"\xff\xfe bad\n")
    with pytest.raises(UserError, match=r"byte offset 100.*--errors replace"):
        Tokenizer.train(TokenizerConfig(input=[str(tmp_path / "bad.txt")], kind="char"), progress=False)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        Tokenizer.load(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path)


# --------------------------------------------------------------------------------------------------
# Hugging Face compatibility


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_transformers_loads_identically(kind, bpe, char, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = bpe if kind == "bpe" else char
    tok.save(tmp_path, model_max_length=256)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["add_bos_token"] is False and cfg["add_eos_token"] is False and cfg["model_max_length"] == 256
    ids = tok.encode(MIXED)
    for loader in (transformers.PreTrainedTokenizerFast, transformers.AutoTokenizer):
        hf = loader.from_pretrained(str(tmp_path))
        assert hf.encode(MIXED, add_special_tokens=True) == ids
        assert hf.decode(ids) == tok.decode(ids)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
        assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (tok.eos_id, tok.bos_id, tok.pad_id)
        assert hf.unk_token_id == tok.unk_id
        assert hf.model_max_length == 256
        assert len(hf) == tok.vocab_size
    if kind == "bpe":
        assert tok.decode(ids) == MIXED


def test_chat_template_matches_transformers(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    custom = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
        "{% if loop.first and m['role'] == 'system' %}{% continue %}{% endif %}\n"
        "  [{{ m['role'] | upper }}] {{ m['content'] | trim }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    )
    for template in (None, custom):
        tok = Tokenizer.load(bpe.save(tmp_path / ("default" if template is None else "custom")))
        tok.chat_template = template or tok.chat_template
        d = tok.save(tmp_path / "saved")
        hf = transformers.AutoTokenizer.from_pretrained(str(d))
        for gen in (False, True):
            ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen)
            assert ours == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    assert bpe.apply_chat_template(MESSAGES[1:2], add_generation_prompt=True) == \
        "<|im_start|>user\nSay hi 👋<|im_end|>\n<|im_start|>assistant\n"
    tok.chat_template = custom
    with pytest.raises(UserError, match="bad role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_load_hugging_face_style_directory(bpe, tmp_path):
    """HF model dirs: special tokens as dicts, added_tokens_decoder, no pad token, template in a file."""
    bpe.save(tmp_path)
    cfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": {"content": "<|im_start|>", "lstrip": False, "__type": "AddedToken"},
        "eos_token": {"content": "<|im_end|>"},
        "unk_token": None,
        "added_tokens_decoder": {"0": {"content": "<|endoftext|>", "special": True}},
        "chat_template": "inline {{ messages[0]['content'] }}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.load(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (3, 4, 4)  # pad falls back to eos
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "inline x"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json {{ messages[0]['content'] }}"}))
    assert Tokenizer.load(tmp_path).chat_template == "json {{ messages[0]['content'] }}"
    (tmp_path / "chat_template.jinja").write_text("jinja {{ messages[0]['content'] }}")
    assert Tokenizer.load(tmp_path).chat_template == "jinja {{ messages[0]['content'] }}"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").unlink()
    cfg["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "dflt"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.load(tmp_path).chat_template == "dflt"
    # A bare tokenizer.json (no config): the usual special tokens are found by name.
    (tmp_path / "tokenizer_config.json").unlink()
    bare = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (bare.eos_id, bare.bos_id, bare.pad_id) == (0, 1, 2)


def test_save_preserves_foreign_config_and_removes_stale_template(bpe, tmp_path):
    bpe.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="GPT2Tokenizer", auto_map={"AutoTokenizer": ["x.Y", None]}, custom_key=7)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_text("stale")
    tok = Tokenizer.load(tmp_path)
    assert tok.chat_template == "stale"
    tok.chat_template = "fresh"
    tok.save(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    assert Tokenizer.load(tmp_path).chat_template == "fresh"
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast" and saved["custom_key"] == 7
    assert "auto_map" not in saved
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # atomic writes leave no temp files


# --------------------------------------------------------------------------------------------------
# Streaming


@pytest.mark.parametrize("skip", [False, True])
def test_stream_decoder_matches_decode(bpe, char, skip):
    text = "Emoji 🤖🎉 and 中文字符 mixed, then <|im_end|> ascii.\n👨‍👩‍👧 family"
    for tok in (bpe, char):
        ids = tok.encode(text)
        dec = StreamDecoder(tok, skip_special_tokens=skip)
        pieces = [dec.feed(i) for i in ids]
        pieces.append(dec.flush())
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)
    # Byte-level BPE splits the rare multi-byte characters over several tokens: some feeds must wait.
    ids = bpe.encode("🤖")
    assert len(ids) > 1
    dec = StreamDecoder(bpe)
    assert [dec.feed(i) for i in ids][:-1] == [""] * (len(ids) - 1)
