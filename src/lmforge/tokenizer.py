"""Tokenizers: byte-level BPE or one token per character, built on Hugging Face ``tokenizers``.

A tokenizer is saved as ``tokenizer.json`` (the ``tokenizers`` format) plus ``tokenizer_config.json``
(special tokens, chat template), so ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it and gives
the same ids. ``Tokenizer.load`` reads lmforge tokenizers, checkpoints and Hugging Face model directories.

Special tokens take the lowest ids, in this order (``<|unk|>`` for the char kind only):

    0 <|endoftext|> (eos)  1 <|bos|>  2 <|pad|>  3 <|im_start|>  4 <|im_end|>  5 <|unk|>
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from .config import ConfigError, TokenizerConfig, UserError
from .fsutil import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer as HFTokenizer

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|bos|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (EOS_TOKEN, BOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

# ChatML (used by Qwen, SmolLM2 and others): <|im_start|>role\ncontent<|im_end|>\n
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# What transformers writes when a tokenizer has no length limit (VERY_LARGE_INTEGER).
UNLIMITED_LENGTH = int(1e30)

# The char kind splits text into single code points; "." would miss newlines in Oniguruma.
_CHAR_SPLIT_PATTERN = r"[\s\S]"

# Named special tokens as transformers calls them in tokenizer_config.json.
_NAMED = ("bos_token", "eos_token", "pad_token", "unk_token")
# Fallbacks for a bare tokenizer.json without tokenizer_config.json (first one present wins).
_GUESSES = {
    "eos_token": (EOS_TOKEN, "</s>", "<eos>"),
    "bos_token": (BOS_TOKEN, "<s>", "<bos>"),
    "pad_token": (PAD_TOKEN, "<pad>"),
    "unk_token": (UNK_TOKEN, "<unk>"),
}
# Tokens that end an assistant turn in common chat formats (ChatML, Llama 3, Gemma).
_TURN_END_TOKENS = (IM_END_TOKEN, "<|eot_id|>", "<end_of_turn>", "<|end|>")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

# Whitespace as ``\s`` matches it in the GPT-2 pre-tokenizer regex that ``tokenizers`` runs (Oniguruma,
# Unicode): tab to carriage return, NEL and the Zs/Zl/Zp categories. Not Python's ``\s`` (which adds
# U+001C..U+001F). tests/test_tokenizer.py checks this set against the library for every code point.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# A "unit": a whitespace run and the non-whitespace run after it (or trailing whitespace).
_UNIT = re.compile(f"[{_WS}]*[^{_WS}]+|[{_WS}]+")
_WS_CHARS = frozenset(c for c in map(chr, range(0x3001)) if re.fullmatch(f"[{_WS}]", c))  # U+3000 is the last


def _token_content(value: Any) -> Optional[str]:
    """A special token in tokenizer_config.json is a string, a dict {"content": ...} or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """A trained tokenizer: encode/decode, special token ids, chat template, save/load."""

    def __init__(self, tok: "HFTokenizer", config: Optional[dict] = None, chat_template: Optional[str] = None):
        # Saved HF tokenizers sometimes enable truncation/padding; lmforge always wants the raw ids.
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self._config: dict = dict(config or {})
        self.chat_template: Optional[str] = chat_template
        self.model_max_length: int = int(self._config.get("model_max_length") or UNLIMITED_LENGTH)
        self.add_bos_token: bool = bool(self._config.get("add_bos_token", False))
        self.add_eos_token: bool = bool(self._config.get("add_eos_token", False))
        self._special: dict[str, Optional[str]] = {}
        for name in _NAMED:
            if name in self._config:
                self._special[name] = _token_content(self._config[name])
            elif not config:
                self._special[name] = next((t for t in _GUESSES[name] if tok.token_to_id(t) is not None), None)
            else:
                self._special[name] = None
        extra = self._config.get("additional_special_tokens") or self._config.get("extra_special_tokens") or []
        if isinstance(extra, dict):  # transformers 4.5x "extra_special_tokens" is a name -> token mapping
            extra = list(extra.values())
        self._extra = [t for t in (_token_content(x) for x in extra) if t is not None]
        if not config:
            self._extra = [t for t in (IM_START_TOKEN, IM_END_TOKEN) if tok.token_to_id(t) is not None]
        self._json_cache: Optional[dict] = None
        self._hash: Optional[str] = None
        self._vocab_size: Optional[int] = None
        self._char_table: Optional[tuple] = None  # (sorted code points, ids, unk id, added strings)
        self._units: Any = None  # _UnitEncoder, False when this tokenizer can't use one, None: not decided

    # ----------------------------------------------------------------------------------------------
    # Training

    @classmethod
    def train(cls, cfg: TokenizerConfig, progress: bool = True) -> "Tokenizer":
        """Train on ``cfg.input`` (not saved: call ``save(cfg.out)``)."""
        from .data.corpus import iter_pieces, list_sources

        cfg.validate()
        list_sources(cfg.input)  # fail on a missing path before any work
        texts = (p.text for p in iter_pieces(cfg.input, text_field=cfg.text_field, errors=cfg.errors))
        return cls.train_from_iterator(texts, cfg.kind, cfg.vocab_size, cfg.min_frequency, progress=progress)

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], kind: str = "bpe", vocab_size: int = 8192,
                            min_frequency: int = 2, progress: bool = False) -> "Tokenizer":
        """Train a byte-level BPE (``kind="bpe"``) or character (``kind="char"``) tokenizer on ``texts``."""
        if kind == "bpe":
            if vocab_size < 256 + len(SPECIAL_TOKENS):
                raise ConfigError(f"vocab_size: byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)} "
                                  f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
            tok = _train_bpe(texts, vocab_size, min_frequency, progress)
        elif kind == "char":
            tok = _train_char(texts)
        else:
            raise ConfigError(f"kind: must be 'bpe' or 'char', got {kind!r}")
        config = {
            "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
            "unk_token": UNK_TOKEN if kind == "char" else None,
            "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
        }
        return cls(tok, config, chat_template=DEFAULT_CHAT_TEMPLATE)

    # ----------------------------------------------------------------------------------------------
    # Save / load

    def save(self, directory: str | Path, model_max_length: Optional[int] = None) -> Path:
        """Write tokenizer.json and tokenizer_config.json into ``directory`` (created if needed), atomically."""
        d = Path(directory)
        try:
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_text(d / "tokenizer.json", self._tok.to_str(pretty=True))
            atomic_write_text(d / "tokenizer_config.json",
                              json.dumps(self.hf_config(model_max_length), indent=2, ensure_ascii=False) + "\n")
            # transformers prefers these files over the inline template; a stale one would contradict ours.
            for stale in ("chat_template.jinja", "chat_template.json"):
                (d / stale).unlink(missing_ok=True)
        except OSError as e:
            raise UserError(f"cannot write the tokenizer to {d}: {e.strerror or e}") from None
        return d

    def hf_config(self, model_max_length: Optional[int] = None) -> dict:
        """The tokenizer_config.json contents (what transformers reads)."""
        # The generic class makes transformers use tokenizer.json exactly as written (a model-specific class
        # may rebuild or adjust the pipeline), so its ids always equal ours.
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **self._config}
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg.pop("auto_map", None)  # custom tokenizer code is not shipped with our copy
        cfg.update({name: self._special[name] for name in _NAMED})
        cfg.pop("extra_special_tokens", None)
        cfg["additional_special_tokens"] = list(self._extra)
        cfg["model_max_length"] = int(model_max_length or self.model_max_length)
        cfg["add_bos_token"] = self.add_bos_token
        cfg["add_eos_token"] = self.add_eos_token
        # Keep decode() exact: transformers would otherwise be free to remove spaces before punctuation.
        cfg["clean_up_tokenization_spaces"] = False
        cfg["chat_template"] = self.chat_template or DEFAULT_CHAT_TEMPLATE
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a directory holding tokenizer.json (lmforge tokenizer, checkpoint or HF model dir)."""
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(path)
        if p.is_file() and p.name == "tokenizer.json":
            p = p.parent
        if not p.exists():
            raise UserError(f"tokenizer not found: {p} does not exist")
        if not p.is_dir():
            raise UserError(f"tokenizer path {p} is not a directory; give the directory holding tokenizer.json")
        tj = p / "tokenizer.json"
        if not tj.is_file():
            hint = " (it has only a slow tokenizer; convert it with transformers first)" \
                if (p / "tokenizer.model").exists() else ""
            raise UserError(f"no tokenizer.json in {p}{hint}; give a directory made by `lmforge tokenizer train`, "
                            f"a checkpoint or a Hugging Face model directory")
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for bad files
            raise UserError(f"{tj} is not a valid tokenizer file: {str(e).splitlines()[0] if str(e) else e}") from None
        config = _read_json(p / "tokenizer_config.json") if (p / "tokenizer_config.json").is_file() else {}
        return cls(tok, config, chat_template=_find_chat_template(p, config))

    # ----------------------------------------------------------------------------------------------
    # Properties

    @property
    def vocab_size(self) -> int:
        """Number of ids (embedding rows needed): the vocabulary plus added tokens."""
        if self._vocab_size is None:
            vocab = self._tok.get_vocab(with_added_tokens=True)
            top = max(vocab.values(), default=-1) + 1  # ids may have holes in foreign tokenizers
            self._vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), top)
        return self._vocab_size

    def _id(self, name: str) -> Optional[int]:
        t = self._special.get(name)
        return None if t is None else self._tok.token_to_id(t)

    @property
    def bos_id(self) -> Optional[int]:
        return self._id("bos_token")

    @property
    def eos_id(self) -> Optional[int]:
        return self._id("eos_token")

    @property
    def pad_id(self) -> Optional[int]:
        """The padding id; the eos id when the tokenizer has no pad token (common for HF LMs)."""
        pid = self._id("pad_token")
        return self.eos_id if pid is None else pid

    @property
    def unk_id(self) -> Optional[int]:
        return self._id("unk_token")

    @property
    def special_tokens(self) -> dict:
        """HF-style map: bos_token, eos_token, pad_token, unk_token (str or None), additional_special_tokens."""
        return {**{n: self._special[n] for n in _NAMED}, "additional_special_tokens": list(self._extra)}

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: eos and the chat turn terminator when the vocabulary has one."""
        ids = [self.eos_id] + [self._tok.token_to_id(t) for t in _TURN_END_TOKENS]
        return sorted({i for i in ids if i is not None})

    @property
    def kind(self) -> str:
        """'bpe' (byte-level BPE), 'char', or the lowercased model type of another HF tokenizer."""
        data = self._json()
        mtype = data.get("model", {}).get("type", "unknown")
        if mtype == "WordLevel" and _is_char_pretokenizer(data.get("pre_tokenizer")):
            return "char"
        return mtype.lower()

    @property
    def hash(self) -> str:
        """sha256 of the canonical tokenizer.json: identifies the exact tokenization of prepared data."""
        if self._hash is None:
            canonical = json.dumps(self._json(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            self._hash = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._hash

    def _json(self) -> dict:
        if self._json_cache is None:
            self._json_cache = json.loads(self._tok.to_str())
        return self._json_cache

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    # Pickle through the JSON form (used to hand the tokenizer to worker processes).
    def __getstate__(self) -> dict:
        return {"json": self._tok.to_str(), "config": self._config, "chat_template": self.chat_template,
                "model_max_length": self.model_max_length}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.__init__(HFTokenizer.from_str(state["json"]), state["config"], state["chat_template"])
        self.model_max_length = state["model_max_length"]

    # ----------------------------------------------------------------------------------------------
    # Encode / decode

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(int(i))

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token strings in the text (e.g. ``<|im_end|>``) map to their ids."""
        ids = self._encode_arrays([text])[0].tolist()
        if add_bos:
            if self.bos_id is None:
                raise UserError("this tokenizer has no bos token")
            ids.insert(0, self.bos_id)
        if add_eos:
            if self.eos_id is None:
                raise UserError("this tokenizer has no eos token")
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (the fast batch encoder; no special tokens added)."""
        return [a.tolist() for a in self._encode_arrays(list(texts))]

    def _encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Encode to int64 arrays; the fastest path for bulk tokenization (used by prepare)."""
        if self.kind == "char":
            return self._fill_in(texts, [self._encode_char_fast(t) for t in texts])
        units = self._unit_encoder()
        if units:
            return self._fill_in(texts, units.encode(texts))
        return self._encode_hf(texts)

    def _fill_in(self, texts: list[str], fast: list[Optional[np.ndarray]]) -> list[np.ndarray]:
        """A fast path's results, with the texts it left out (None) encoded by the full pipeline."""
        slow = [t for t, a in zip(texts, fast) if a is None]
        if not slow:
            return fast
        it = iter(self._encode_hf(slow))
        return [next(it) if a is None else a for a in fast]

    def _unit_encoder(self) -> "Optional[_UnitEncoder]":
        if self._units is None:
            data = self._json()
            pre, model = data.get("pre_tokenizer") or {}, data.get("model") or {}
            plain_byte_level = (data.get("normalizer") is None and pre.get("type") == "ByteLevel"
                                and not pre.get("add_prefix_space") and pre.get("use_regex", True)
                                and model.get("type") == "BPE" and model.get("dropout") is None)
            added = [t["content"] for t in data.get("added_tokens") or []]
            self._units = _UnitEncoder(self._tok, added) if plain_byte_level and all(added) else False
        return self._units or None

    def _encode_hf(self, texts: list[str]) -> list[np.ndarray]:
        # encode_batch_fast (tokenizers >= 0.21) skips computing offsets, which we never use.
        enc = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        try:
            encodings = enc(texts, add_special_tokens=False)
        except TypeError:
            # Lone surrogates (e.g. from a "\ud800" escape in JSON) are not Unicode scalar values and the
            # Rust encoder rejects them; encode each as U+FFFD, as a UTF-8 decoder would.
            encodings = enc([_LONE_SURROGATE.sub("\ufffd", t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def _encode_char_fast(self, text: str) -> Optional[np.ndarray]:
        """Char kind: look code points up in a table (~50x faster than the generic pipeline).

        Gives the same ids as the tokenizers pipeline; returns None (use that pipeline) when the text holds
        an added-token string, which the pipeline would match as one token.
        """
        if self._char_table is None:
            vocab = self._tok.get_vocab(with_added_tokens=False)
            added = sorted({t for t in self._tok.get_vocab(with_added_tokens=True) if t not in vocab}
                           | set(self._special.values()) - {None} | set(self._extra))
            singles = sorted((ord(t), i) for t, i in vocab.items() if len(t) == 1 and t not in added)
            keys = np.array([c for c, _ in singles], dtype=np.uint32)
            vals = np.array([i for _, i in singles], dtype=np.int64)
            self._char_table = (keys, vals, self.unk_id, added)
        keys, vals, unk, added = self._char_table
        if unk is None or len(keys) == 0 or any(a in text for a in added):
            return None
        try:
            cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        except UnicodeEncodeError:  # lone surrogates
            return None
        idx = np.minimum(np.searchsorted(keys, cps), len(keys) - 1)
        return np.where(keys[idx] == cps, vals[idx], unk).astype(np.int64)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------------------------------
    # Chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """Render ``messages`` ([{"role", "content"}, ...]) with the chat template, as transformers does."""
        template = _compile_template(self.chat_template or DEFAULT_CHAT_TEMPLATE)
        variables = {n: self._special[n] for n in _NAMED}
        variables["additional_special_tokens"] = list(self._extra)
        variables.update(kwargs)
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except _template_error() as e:
            raise UserError(f"chat template: {e}") from None


# --------------------------------------------------------------------------------------------------
# Training helpers


class _UnitEncoder:
    """Byte-level BPE a whole whitespace-delimited unit at a time, each unit's ids cached.

    The GPT-2 pre-tokenizer regex has no look-behind, and no piece it makes holds whitespace after a
    non-whitespace character, so the text always splits between a non-whitespace character and the
    whitespace after it, and what follows such a point tokenizes as it would on its own. A text is
    therefore the concatenation of its units' ids (``_UNIT``). Natural text repeats a small set of units
    (" the", " said,", "\\n\\nThe"), so most units are a dict lookup; the new ones of a batch are encoded
    by ``tokenizers`` in one call (``_learn``). Texts holding an added token's string return None (the full
    pipeline matches those first). The cache is cleared when it reaches ``max_units`` entries.
    """

    JOIN_CHARS = 32 << 10
    # Above this many new units per unit in a batch (text with few repeats, like random strings or hashes)
    # the cache costs more than it saves (a new unit costs more than the plain pipeline, a cached one much
    # less): the next SKIP_CALLS calls go to the plain pipeline, then it looks again.
    MAX_NEW = 0.3
    SKIP_CALLS = 8

    def __init__(self, tok: "HFTokenizer", added: list[str], max_units: int = 1 << 18):
        self._tok = tok
        self._added = added
        self._cache: dict[str, bytes] = {}
        self._lock = threading.Lock()  # serve and chat may encode from several threads
        self._token_bytes: Optional[np.ndarray] = None  # bytes in each token
        self._skip = 0
        self.max_units = max_units

    def encode(self, texts: list[str]) -> list[Optional[np.ndarray]]:
        if self._skip:  # text that barely repeats: the plain pipeline is faster (see MAX_NEW)
            self._skip -= 1
            return [None] * len(texts)
        split = [None if any(a in t for a in self._added) else _UNIT.findall(t) for t in texts]
        with self._lock:
            try:
                new = self._learn_new(split)
            except TypeError:  # lone surrogates, which the library refuses: leave those texts to the caller
                split = [None if u is None or _LONE_SURROGATE.search(t) else u for t, u in zip(texts, split)]
                new = self._learn_new(split)
            get = self._cache.__getitem__
            out = [None if u is None else np.frombuffer(b"".join(map(get, u)), dtype=np.int32).astype(np.int64)
                   for u in split]
        if new > self.MAX_NEW * sum(len(u) for u in split if u is not None):
            self._skip = self.SKIP_CALLS
        return out

    def _learn_new(self, split: list[Optional[list[str]]]) -> int:
        seen = set().union(*(u for u in split if u is not None))
        new = seen.difference(self._cache)
        if new and len(self._cache) + len(new) > self.max_units:
            self._cache.clear()
            new = seen
        if new:
            self._learn(list(new))
        return len(new)

    def _learn(self, units: list[str]) -> None:
        # A unit that starts with whitespace ends with non-whitespace, so any number of such units joined
        # tokenize as each alone: encode them joined into texts of about JOIN_CHARS (one text per unit costs
        # several times more; one huge text makes the library hold many times the text's size in memory) and
        # cut the ids where each unit's bytes end. The few others (a text's first unit, trailing whitespace)
        # go alone.
        joinable: list[str] = []
        rest: list[str] = []
        for u in units:
            (joinable if u[0] in _WS_CHARS and u[-1] not in _WS_CHARS else rest).append(u)
        groups: list[list[str]] = [[]]
        size = 0
        for u in joinable:
            if size >= self.JOIN_CHARS:
                groups.append([])
                size = 0
            groups[-1].append(u)
            size += len(u)
        groups = [g for g in groups if g]
        texts = ["".join(g) for g in groups]
        if any(a in t for t in texts for a in self._added):  # a join made an added token's string
            groups, texts, rest = [], [], units
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(texts + rest, add_special_tokens=False) if texts or rest else []
        for g, e in zip(groups, encodings):
            if not self._store_joined(g, np.asarray(e.ids, dtype=np.int64)):
                rest += g  # a token crossed a unit boundary, which the regex rules out: trust none of it
                encodings += encode(g, add_special_tokens=False)
        for u, e in zip(rest, encodings[len(groups):]):
            self._cache[u] = np.asarray(e.ids, dtype=np.int32).tobytes()

    def _store_joined(self, units: list[str], ids: np.ndarray) -> bool:
        if self._token_bytes is None:
            lengths = np.zeros(self._tok.get_vocab_size(with_added_tokens=True), dtype=np.int64)
            for t, i in self._tok.get_vocab(with_added_tokens=False).items():
                lengths[i] = len(t)  # byte-level: one symbol per byte
            self._token_bytes = lengths
        ends = np.cumsum(self._token_bytes[ids])
        unit_ends = np.cumsum([len(u.encode("utf-8")) for u in units])
        last = np.searchsorted(ends, unit_ends)  # the token that ends each unit
        if len(ids) == 0 or last[-1] >= len(ids) or not np.array_equal(ends[last], unit_ends):
            return False
        blob = ids.astype(np.int32).tobytes()
        first = 0
        for u, stop in zip(units, (last * 4 + 4).tolist()):
            self._cache[u] = blob[first:stop]
            first = stop
        return True


class _Feed:
    """Wraps the text iterator handed to Rust: counts text, and keeps an exception raised while reading
    (e.g. a UserError for bad UTF-8) so it is re-raised as itself after training returns."""

    def __init__(self, texts: Iterable[str]):
        self.texts = texts
        self.chars = 0
        self.error: Optional[BaseException] = None

    def __iter__(self) -> Iterator[str]:
        try:
            for t in self.texts:
                if t:
                    self.chars += len(t)
                    yield t
        except Exception as e:  # noqa: BLE001 - re-raised by _finish
            self.error = e

    def finish(self) -> None:
        if self.error is not None:
            raise self.error
        if self.chars == 0:
            raise UserError("the training text is empty: no characters to learn a vocabulary from")


def _train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, progress: bool) -> "HFTokenizer":
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    # GPT-2 byte-level BPE: text -> UTF-8 bytes -> 256 printable symbols, so every string is encodable.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
        special_tokens=list(SPECIAL_TOKENS),  # added first, so they get ids 0..4
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes even if unseen
    )
    feed = _Feed(texts)
    tok.train_from_iterator(feed, trainer)
    feed.finish()
    return tok


def _train_char(texts: Iterable[str]) -> "HFTokenizer":
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    feed = _Feed(texts)
    chars: set[str] = set()
    for t in feed:
        chars.update(t)
    feed.finish()
    specials = list(SPECIAL_TOKENS) + [UNK_TOKEN]
    vocab = {s: i for i, s in enumerate(specials)}
    for c in sorted(chars):  # code point order, like nanoGPT's sorted(set(text))
        vocab[c] = len(vocab)
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_CHAR_SPLIT_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join tokens with nothing in between (the default joins with spaces)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def _is_char_pretokenizer(pt: Optional[dict]) -> bool:
    return bool(pt) and pt.get("type") == "Split" and pt.get("pattern", {}).get("Regex") == _CHAR_SPLIT_PATTERN


# --------------------------------------------------------------------------------------------------
# Loading helpers


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def _find_chat_template(d: Path, config: dict) -> Optional[str]:
    """The chat template, looked up where transformers looks: a .jinja file, a .json file, then inline."""
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "chat_template.json").is_file():
        value = _read_json(d / "chat_template.json").get("chat_template")
    else:
        value = config.get("chat_template")
    if isinstance(value, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default", next(iter(named.values()), None))
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------------------------------
# Chat templates (jinja2 with the environment transformers uses, so templates render identically)


def _template_error() -> type:
    import jinja2

    return jinja2.exceptions.TemplateError


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """Accept {% generation %}...{% endgeneration %} (used by HF to mark assistant text) as a no-op."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"chat template has a syntax error (line {e.lineno}): {e.message}") from None


# --------------------------------------------------------------------------------------------------
# Streaming


class StreamDecoder:
    """Turns a stream of ids into text pieces for printing as they come.

    Byte-level BPE can split one character (e.g. an emoji's 4 bytes) over several tokens; decoding them
    one by one would print U+FFFD. We decode a small window of recent ids and emit the new text only once it
    no longer ends in U+FFFD (the approach of HF text-generation-inference). The pieces joined equal
    ``decode(all_ids)``.
    """

    # A character is at most 4 bytes; past this many held tokens the U+FFFD is real, so emit it.
    MAX_PENDING = 8

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window (one emitted group of context)
        self._read = 0  # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def feed(self, token_id: int) -> str:
        """Add one id; return the text that became printable (often '', sometimes several characters)."""
        self.ids.append(int(token_id))
        return self._emit(force=len(self.ids) - self._read > self.MAX_PENDING)

    def flush(self) -> str:
        """Return whatever is still held (call at the end of the stream)."""
        return self._emit(force=True)

    def _emit(self, force: bool) -> str:
        if self._read == len(self.ids):
            return ""
        # Decoding with the previous group as context keeps tokenizer-specific spacing (e.g. SentencePiece's
        # leading-space rule) the same as decoding the whole sequence.
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if after.endswith("\ufffd") and not force:
            return ""  # an incomplete character: wait for its remaining bytes
        new = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return new
