"""Fine-tuning data: instruction (SFT) conversations with their loss mask and packing, and labeled texts
for classification.

SFT examples are .jsonl lines in Alpaca form {"instruction", "input"?, "output"} or chat form
{"messages": [{"role", "content"}, ...]}. A conversation is rendered with the model's chat template (the
jinja semantics of Hugging Face's ``apply_chat_template``; ChatML for a model without a template). The loss
falls on assistant tokens only: each assistant message is located by rendering the conversation up to it
(with the generation prompt) and up to its end, and only the tokens in between are targets. The answer's
end-of-turn token (ChatML's <|im_end|>) is a target too, and when the template emits no stop token the
tokenizer's EOS is appended, so a tuned model learns to stop.

Packing puts several short examples into one row of ``max_len`` tokens. Each token carries its example's
index (``doc_ids``, so attention never crosses examples) and its position inside the example
(``positions``, restarting at 0), so a packed example computes exactly what it computes alone.

Sample order is a function of (seed, global sample index) only, as in pretraining, so resume is exact.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..config import UserError

IGNORE = -100


# --------------------------------------------------------------------------------------------------
# Reading


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a malformed line is an error naming its number."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file not found: {p}")
    if p.is_dir():
        raise UserError(f"{p} is a directory; give a .jsonl file")
    rows = []
    try:
        with open(p, "r", encoding="utf-8") as f:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{p} line {no}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{p} line {no}: expected a JSON object, got {type(obj).__name__}")
                rows.append((no, obj))
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text (byte offset {e.start})") from None
    if not rows:
        raise UserError(f"{p} holds no examples (the file is empty)")
    return rows


def to_messages(obj: dict, where: str, system: Optional[str] = None) -> list[dict]:
    """An example in Alpaca or chat form -> a list of {"role", "content"} messages."""
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        out = []
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise UserError(f"{where}: message {i} needs a string \"role\" and a string \"content\"")
            out.append({"role": m["role"], "content": m["content"]})
    elif "instruction" in obj or "output" in obj:
        if not isinstance(obj.get("instruction"), str) or not isinstance(obj.get("output"), str):
            raise UserError(f"{where}: an Alpaca example needs string \"instruction\" and \"output\" fields")
        prompt = obj["instruction"]
        extra = obj.get("input")
        if extra:
            if not isinstance(extra, str):
                raise UserError(f"{where}: \"input\" must be a string")
            prompt = f"{prompt}\n\n{extra}"
        out = [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]
        if isinstance(obj.get("system"), str) and obj["system"]:
            out.insert(0, {"role": "system", "content": obj["system"]})
    else:
        raise UserError(f"{where}: expected {{\"messages\": [...]}} or {{\"instruction\", \"input\", \"output\"}}, "
                        f"got the keys {sorted(obj)}")
    if system and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant message to learn from")
    return out


# --------------------------------------------------------------------------------------------------
# Rendering with the loss mask


def _render(tok, messages: list[dict], gen_prompt: bool, where: str) -> str:
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=gen_prompt)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def encode_conversation(tok, messages: list[dict], where: str = "example") -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is a loss target (assistant
    text, its end-of-turn token, and an appended EOS when the template has no stop token)."""
    from ..generate import wants_bos

    full = _render(tok, messages, False, where)
    for m in messages:  # a template that silently drops a role would train on a different conversation
        if m["content"].strip() and m["content"].strip() not in full:
            raise UserError(f"{where}: the chat template does not render the {m['role']!r} message; it lacks "
                            f"that role (use roles the template knows, or a template that handles {m['role']!r})")
    stop = set(getattr(tok, "stop_ids", ()) or ())
    ids: list[int] = []
    mask: list[bool] = []
    done = ""  # text rendered so far

    def add(text: str, target: bool) -> None:
        piece = tok.encode(text) if text else []
        ids.extend(piece)
        mask.extend([target] * len(piece))

    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tok, messages[:i], True, where)  # ... up to "<|im_start|>assistant\n"
        upto = _render(tok, messages[: i + 1], False, where)  # ... through this assistant message
        if not head.startswith(done) or not upto.startswith(head):
            raise UserError(f"{where}: the chat template does not render conversations incrementally (the "
                            f"text before assistant message {i} changes with what follows); SFT needs one that does")
        add(head[len(done):], False)
        answer = upto[len(head):]
        # Targets end with the turn terminator; text after it (ChatML's "\n") belongs to no one.
        body = answer.rstrip()
        n0 = len(ids)
        add(body, True)
        if not any(t in stop for t in ids[n0:]):
            if tok.eos_id is None:
                raise UserError("the tokenizer has no EOS token and its chat template ends answers with none; "
                                "a tuned model could not learn to stop")
            ids.append(tok.eos_id)
            mask.append(True)
        add(answer[len(body):], False)
        done = upto
    if full.startswith(done):  # messages after the last answer (context only)
        add(full[len(done):], False)
    if wants_bos(tok) and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids.insert(0, tok.bos_id)
        mask.insert(0, False)
    return ids, mask


@dataclass
class SFTExample:
    ids: np.ndarray
    """Token ids [n]."""
    target: np.ndarray
    """Bool [n]: token i is a loss target (predicted from tokens < i)."""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def inputs(self) -> np.ndarray:
        return self.ids[:-1]

    @property
    def labels(self) -> np.ndarray:
        return np.where(self.target[1:], self.ids[1:], IGNORE)


def read_conversations(path: str | Path, system: Optional[str] = None) -> list[tuple[str, list[dict]]]:
    """(where, messages) of every example of an SFT .jsonl file; checked before any model is loaded."""
    return [(f"{path} line {no}", to_messages(obj, f"{path} line {no}", system)) for no, obj in read_jsonl(path)]


def load_sft_examples(path: str | Path, tok, max_len: int, system: Optional[str] = None, log=print,
                      conversations: Optional[list[tuple[str, list[dict]]]] = None) -> list[SFTExample]:
    """Read, render and mask every example; an example longer than ``max_len`` + 1 tokens loses its
    oldest tokens (its answer keeps its end, so the model still learns to stop)."""
    examples, cut = [], 0
    for where, messages in conversations if conversations is not None else read_conversations(path, system):
        ids, mask = encode_conversation(tok, messages, where)
        if len(ids) > max_len + 1:
            ids, mask = ids[-(max_len + 1):], mask[-(max_len + 1):]
            cut += 1
        ex = SFTExample(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool))
        if not ex.target[1:].any():
            continue  # nothing left to learn after truncation
        examples.append(ex)
    if cut:
        log(f"note: {cut} example(s) longer than {max_len} tokens were cut from the left")
    if not examples:
        raise UserError(f"{path} holds no usable examples")
    return examples


# --------------------------------------------------------------------------------------------------
# Packing and batches


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group examples (by their input lengths) into rows of at most ``capacity`` tokens: first fit in
    decreasing length order, a simple bin packing that fills rows well. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return [sorted(r) for r in rows]


def shuffled_index(g: int, n: int, seed: int) -> int:
    """The row read at global sample index g: a fresh permutation of the n rows every epoch."""
    epoch, k = divmod(g, n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return int(perm[k])


class SFTBatches:
    """Rows of SFT examples -> batches {x, y, positions, doc_ids} (packed) or {x, y} (one example a row)."""

    def __init__(self, examples: list[SFTExample], max_len: int, pad_id: int, packed: bool = True, seed: int = 0):
        self.examples = examples
        self.max_len = max_len
        self.pad_id = pad_id
        self.packed = packed
        self.seed = seed
        if packed:
            self.rows = pack([len(e) - 1 for e in examples], max_len)
        else:
            self.rows = [[i] for i in range(len(examples))]

    def __len__(self) -> int:
        return len(self.rows)

    def target_tokens(self) -> int:
        return int(sum(e.target[1:].sum() for e in self.examples))

    def make(self, rows: list[list[int]]) -> dict:
        if not self.packed:
            T = max(len(self.examples[r[0]]) - 1 for r in rows)
            x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
            y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
            for b, r in enumerate(rows):
                e = self.examples[r[0]]
                x[b, : len(e) - 1] = torch.from_numpy(e.inputs)
                y[b, : len(e) - 1] = torch.from_numpy(e.labels)
            return {"x": x, "y": y}
        T = self.max_len
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        pos = torch.zeros((len(rows), T), dtype=torch.long)
        doc = torch.full((len(rows), T), -1, dtype=torch.long)  # padding: its own "document"
        for b, r in enumerate(rows):
            t = 0
            for d, i in enumerate(r):
                e = self.examples[i]
                n = len(e) - 1
                x[b, t:t + n] = torch.from_numpy(e.inputs)
                y[b, t:t + n] = torch.from_numpy(e.labels)
                pos[b, t:t + n] = torch.arange(n)
                doc[b, t:t + n] = d
                t += n
        return {"x": x, "y": y, "positions": pos, "doc_ids": doc}

    def get_batch(self, indices: list[int]) -> dict:
        return self.make([self.rows[shuffled_index(g, len(self.rows), self.seed)] for g in indices])

    def fixed_batches(self, batch_size: int, limit: int) -> list[dict]:
        """The first ``limit`` batches in file order (validation)."""
        out = []
        for s in range(0, len(self.rows), batch_size):
            if len(out) >= limit:
                break
            out.append(self.make(self.rows[s:s + batch_size]))
        return out


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded random ``fraction`` is held out (at least one example
    when fraction > 0 and n > 1)."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    perm = np.random.default_rng([seed, 7]).permutation(n)
    k = min(max(1, round(n * fraction)), n - 1)
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


# --------------------------------------------------------------------------------------------------
# Classification


@dataclass
class LabeledText:
    text: str
    label: str
    where: str


def read_labeled(path: str | Path, text_field: str = "text", label_field: str = "label") -> list[LabeledText]:
    """Labeled texts from a .jsonl file ({"text", "label"}) or a folder holding one subfolder of text
    files per label (the subfolder's name is the label)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"data not found: {p}")
    out: list[LabeledText] = []
    if p.is_dir():
        subdirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not subdirs:
            raise UserError(f"{p} holds no label folders (expected one subfolder of .txt files per label)")
        for d in subdirs:
            for f in sorted(d.rglob("*")):
                if not f.is_file() or f.name.startswith("."):
                    continue
                try:
                    text = f.read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{f}: not UTF-8 text (byte offset {e.start})") from None
                if text.strip():
                    out.append(LabeledText(text, d.name, str(f)))
        if not out:
            raise UserError(f"{p} holds no examples (its label folders hold no text files)")
        return out
    for no, obj in read_jsonl(p):
        where = f"{p} line {no}"
        text, label = obj.get(text_field), obj.get(label_field)
        if not isinstance(text, str):
            raise UserError(f"{where}: needs a string field {text_field!r} (see --text-field)")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise UserError(f"{where}: needs a string or integer field {label_field!r} (see --label-field)")
        out.append(LabeledText(text, str(label), where))
    return out


def label_ids(examples: list[LabeledText], labels: list[str]) -> list[int]:
    index = {l: i for i, l in enumerate(labels)}
    out = []
    for e in examples:
        if e.label not in index:
            known = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
            raise UserError(f"{e.where}: unknown label {e.label!r} (known: {known})")
        out.append(index[e.label])
    return out


def encode_texts(tok, texts: Sequence[str], max_len: int, suffix: str = "") -> list[list[int]]:
    """Token ids for classification: the text cut so that it and ``suffix`` fit in ``max_len`` tokens
    (with BOS when the model wants one). The head reads the last token, which is the suffix's when there is
    one. Not an appended EOS: in a chat model the hidden state at an end-of-turn token mostly prepares the
    next turn and carries little of the text. Linear probes on frozen SmolLM2-135M features of BBC News
    articles cut to 64 tokens (240 training, 160 held out; ``python -m bench.classify_probe``): 0.856 at the
    last word, 0.700 at an appended EOS, 0.944 at the end of the suffix "\\n\\nTopic:"."""
    from ..generate import wants_bos

    bos = [tok.bos_id] if wants_bos(tok) and tok.bos_id is not None else []
    tail = tok.encode(suffix) if suffix else []
    room = max_len - len(bos) - len(tail)
    if room < 1:
        raise UserError(f"the classification suffix {suffix!r} takes {len(tail)} tokens; max_len {max_len} "
                        f"leaves no room for the text")
    out = []
    for ids in tok.encode_batch(list(texts)):
        ids = bos + ids[:room] + tail
        out.append(ids if ids else [tok.eos_id if tok.eos_id is not None else (tok.pad_id or 0)])
    return out


class ClassifyBatches:
    """Right-padded rows {x, lengths, labels}; the head reads position lengths-1 (the last real token)."""

    def __init__(self, ids: list[list[int]], labels: list[int], pad_id: int, seed: int = 0):
        self.ids = ids
        self.labels = labels
        self.pad_id = pad_id
        self.seed = seed

    def __len__(self) -> int:
        return len(self.ids)

    def make(self, rows: list[int]) -> dict:
        T = max(len(self.ids[r]) for r in rows)
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, : len(self.ids[r])] = torch.tensor(self.ids[r], dtype=torch.long)
        return {"x": x, "lengths": torch.tensor([len(self.ids[r]) for r in rows], dtype=torch.long),
                "labels": torch.tensor([self.labels[r] for r in rows], dtype=torch.long)}

    def get_batch(self, indices: list[int]) -> dict:
        return self.make([shuffled_index(g, len(self.ids), self.seed) for g in indices])

    def fixed_batches(self, batch_size: int, limit: int = 0) -> list[dict]:
        out = []
        for s in range(0, len(self.ids), batch_size):
            if limit and len(out) >= limit:
                break
            out.append(self.make(list(range(s, min(s + batch_size, len(self.ids))))))
        return out
