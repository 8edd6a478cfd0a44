"""Continuous batching: one thread owns the model and decodes every running sequence in one step.

A request (a prompt and n choices) waits in a queue until n of the ``max_batch`` slots are free. It is
then prefilled alone (one forward over its prompt, which yields the first token's logits), its keys and
values are copied into its slots' rows of the slot cache, and from the next step on it decodes together
with everything else that is running: one forward with one new token per slot. A sequence leaves its slot
when it ends (EOS, a stop string, max_tokens, the context window), when its client goes away, or at its
deadline, and the next waiting request takes the slot at once; nobody waits for the batch to drain
(Yu et al. 2022, "Orca", call this iteration-level scheduling).

Each sequence samples with its own settings and its own seeded ``torch.Generator`` (the same
exponential-race sampler as ``lmforge.generate``), so its text depends only on its prompt, its settings
and its seed. With ``batch_invariant`` (the default) a seeded request gives the same text alone or in a
full batch, to the bit; without it a step covers only the slots and key positions in use, and results may
differ in the last bits between batch makeups. How a step keeps the invariance depends on its path:

* Where the compiled step applies (``lmforge.fused``: CPU models laid out for inference), a step runs
  through it, each slot writing and attending at its own length. Its arithmetic for a row does not depend
  on the other rows or on how many there are (checked once per process,
  ``lmforge.kernels.rows_are_independent``), so a step covers only the slots up to the highest busy one.
* Otherwise a step runs the model's forward with a key mask per slot, and every batch-invariant step has
  the same shape, all slots over all key positions of the window, whatever is running: the matrix kernels
  then do the same arithmetic for a row whatever the other rows hold.

Shape legend: M slots in the step, S key slots in its window, K kv heads, D head dim, V vocabulary.
"""
from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..config import GenerateConfig
from ..generate import _TextRow, sample_next

log = logging.getLogger("lmforge.serve")


# --------------------------------------------------------------------------------------------------
# The slot cache


class SlotKVCache:
    """Keys and values of every slot: per layer a [slots, K, capacity, D] buffer where slot r holds its
    sequence's keys at [0, pos_r), pos_r being the number of its tokens already in the cache.

    It implements what ``Attention`` and ``DecoderLM.forward`` use of ``KVCache`` (``update``, ``length``,
    ``advance``) for one-token decode steps over a range of rows that may each sit at a different position.
    ``DecoderLM`` places the T=1 query at key slot ``length`` = S - 1 and always lets a query see that slot
    (``attention_mask``'s "a query sees itself"). So each new key is written twice: at its row's own
    position, where it stays for later steps, and at slot S - 1, where the query finds it now; the key
    mask hides the slots in between (nothing there yet, or leftovers of an earlier occupant)."""

    def __init__(self, model, slots: int, capacity: int):
        cfg = model.cfg
        p = model.tok_emb.weight
        shape = (slots, cfg.kv_heads, capacity, cfg.hd)
        self.k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(cfg.n_layers)]
        self.slots, self.capacity = slots, capacity
        self.max_len = capacity
        self.length = 0
        self._rows = slice(0, 0)
        self._pos_M: Optional[torch.Tensor] = None
        self._arange = torch.arange(slots, device=p.device)

    def prepare(self, rows: slice, pos_M: torch.Tensor, window: int) -> None:
        """Set up one step: rows[i] writes its new key at position pos_M[i]; queries see [0, window)."""
        if not 1 <= window <= self.capacity:
            raise ValueError(f"window {window} outside [1, {self.capacity}]")
        self._rows, self._pos_M = rows, pos_M
        self.length = window - 1  # DecoderLM reads this as the number of past slots

    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if k_BKTD.shape[2] != 1:
            raise ValueError("SlotKVCache takes one new token per row (prefill with a KVCache)")
        k_MKCD, v_MKCD = self.k[layer][self._rows], self.v[layer][self._rows]  # views of the buffers
        M, S = k_MKCD.shape[0], self.length + 1
        rows = self._arange[:M]
        k_MKCD[rows, :, self._pos_M] = k_BKTD[:, :, 0]
        v_MKCD[rows, :, self._pos_M] = v_BKTD[:, :, 0]
        k_MKCD[:, :, S - 1] = k_BKTD[:, :, 0]
        v_MKCD[:, :, S - 1] = v_BKTD[:, :, 0]
        return k_MKCD[:, :, :S], v_MKCD[:, :, :S]

    def advance(self, n: int) -> None:
        pass  # positions are kept per slot by the engine

    def load(self, slot: int, cache, n: int) -> None:
        """Copy the first n positions of row 0 of a prefill ``KVCache`` into ``slot``."""
        for layer in range(len(self.k)):
            self.k[layer][slot, :, :n] = cache.k[layer][0, :, :n]
            self.v[layer][slot, :, :n] = cache.v[layer][0, :, :n]


# --------------------------------------------------------------------------------------------------
# Requests and events


@dataclass
class SamplingParams:
    """What one request asks for (already validated by the API layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_ids: frozenset = frozenset()
    seed: Optional[int] = None
    ignore_eos: bool = False


@dataclass
class Event:
    """What the engine reports for a request: kind "text" (a piece of choice ``index``), "finish"
    (choice ``index`` ended with ``reason``; ``tokens`` generated) or "error" (the whole request failed:
    ``status`` and ``message``)."""

    kind: str
    index: int = 0
    text: str = ""
    reason: str = ""
    tokens: int = 0
    status: int = 0
    message: str = ""


class Request:
    """One submitted request; ``emit`` is called from the engine thread with each Event."""

    def __init__(self, prompt_ids: list[int], n: int, params: SamplingParams, emit: Callable[[Event], None],
                 deadline: float):
        self.prompt_ids = list(prompt_ids)
        self.n = n
        self.params = params
        self.emit = emit
        self.deadline = deadline
        self.cancelled = False
        self.open = n  # choices not finished yet
        self.seqs: list[_Seq] = []

    def cancel(self) -> None:
        """Thread-safe: the engine drops the request (and frees its slots) at its next step."""
        self.cancelled = True


class QueueFull(RuntimeError):
    """The request cannot be queued: too many waiting (status 429) or the server is shutting down (503)."""

    def __init__(self, message: str, status: int = 429):
        super().__init__(message)
        self.status = status


class _Seq:
    """One choice of a request, living in one slot."""

    def __init__(self, req: Request, index: int, slot: int, tokenizer, vocab: int, device):
        p = req.params
        self.req, self.index, self.slot = req, index, slot
        self.pos = len(req.prompt_ids)  # tokens in the cache
        self.pending: Optional[int] = None  # sampled, not yet in the cache
        self.out: list[int] = []
        self.reason = ""
        self.cfg = GenerateConfig(max_new_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                                  top_p=p.top_p, repetition_penalty=p.repetition_penalty)
        self.greedy = p.temperature == 0 or p.top_k == 1
        # Choice i of a seeded request uses seed + i: choice 0 equals the n=1 answer, the others differ.
        seed = (p.seed + index) % 2**64 if p.seed is not None else secrets.randbits(63)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)
        self.pieces: list[str] = []
        self.row = _TextRow(tokenizer, list(p.stop), self.pieces.append)
        self.seen_1V = None
        if p.repetition_penalty != 1.0:
            self.seen_1V = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen_1V[0, torch.tensor(sorted(set(req.prompt_ids)), dtype=torch.long, device=device)] = True
        self.counts_V = None
        if p.presence_penalty or p.frequency_penalty:
            self.counts_V = torch.zeros(vocab, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Owns the model in a background thread; ``submit`` requests from any thread."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_context: Optional[int] = None,
                 max_queue: int = 256, batch_invariant: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.cfg
        self.vocab = cfg.vocab_size
        self.window = min(cfg.block_size, max_context or cfg.block_size)
        self.slots = max_batch
        self.max_queue = max_queue
        self.batch_invariant = batch_invariant
        self.device = next(model.parameters()).device
        pad = getattr(tokenizer, "pad_id", None)
        self.pad_id = pad if pad is not None and 0 <= pad < self.vocab else 0
        # ALiBi biases follow slot distances, which the slot layout does not keep equal to position
        # distances: such models decode one slot at a time (still continuous, just not batched).
        self.per_row = cfg.pos == "alibi"
        self.cache = SlotKVCache(model, self.slots, self.window)
        # The compiled decoding step (lmforge.fused) where it applies (CPU models laid out for inference):
        # each row attends to its own slots only, so a batch-invariant step no longer costs the whole window.
        from ..fused import decode_step_for

        self.fused = None if self.per_row else decode_step_for(model)
        if self.fused is not None and self.slots > self.fused.max_rows:
            self.fused = None
        # Where the compiled step's products give each row the same bits whatever rows run beside it
        # (checked once: lmforge.kernels.rows_are_independent), a batch-invariant step need not cover the
        # free slots: it runs the rows up to the highest busy slot, and a seeded answer stays the same.
        from ..kernels import rows_are_independent

        self.short_steps = not batch_invariant or (self.fused is not None and rows_are_independent())
        self.step_rows = 0  # rows in the last batched step
        self._free = list(range(self.slots))
        self._active: list[_Seq] = []
        self._waiting: collections.deque[Request] = collections.deque()
        self._queued = 0  # sequences waiting
        self._cv = threading.Condition()
        self._stopping = False
        self._drain_at: Optional[float] = None  # shutting down: requests still running then are cancelled
        self._thread: Optional[threading.Thread] = None
        self.steps = 0
        self.tokens = 0
        self.cancelled = 0  # requests whose client went away
        self.timed_out = 0

    # ----------------------------------------------------------------------------------------------
    # Public, any thread

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, req: Request) -> Request:
        if not 0 < len(req.prompt_ids) < self.window:
            raise ValueError(f"prompt of {len(req.prompt_ids)} tokens: must be 1 to {self.window - 1} tokens")
        if not 1 <= req.n <= self.slots:
            raise ValueError(f"n={req.n}: must be 1 to {self.slots} (the decode slots)")
        with self._cv:
            if self._stopping or self._drain_at is not None:
                raise QueueFull("the server is shutting down", status=503)
            if self._queued + req.n > self.max_queue:
                raise QueueFull(f"too many requests waiting ({self._queued} sequences); retry later")
            self._waiting.append(req)
            self._queued += req.n
            self._cv.notify()
        return req

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def drain(self, timeout: float) -> None:
        """Begin shutting down: take no new requests, give running ones ``timeout`` seconds to finish,
        then end them with an error event (503)."""
        with self._cv:
            self._drain_at = time.monotonic() + timeout
            self._cv.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel whatever is still queued or running (each gets an error event) and end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict:
        return {"slots": self.slots, "active": len(self._active), "waiting": self._queued,
                "context_window": self.window, "compiled_step": self.fused is not None, "steps": self.steps,
                "tokens": self.tokens, "cancelled": self.cancelled, "timed_out": self.timed_out}

    # ----------------------------------------------------------------------------------------------
    # The engine thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._waiting or self._active):
                        self._cv.wait(timeout=1.0)
                    if self._stopping:
                        break
                try:
                    self._reap()
                    self._admit()
                    if self._active:
                        self._step()
                except Exception:  # a bug or out of memory: fail what is running, keep serving
                    log.exception("decode step failed")
                    for req in {id(s.req): s.req for s in self._active}.values():
                        self._fail(req, 500, "internal error while generating (see the server log)")
        self._shutdown()

    def _shutdown(self) -> None:
        with self._cv:
            waiting, self._waiting, self._queued = list(self._waiting), collections.deque(), 0
        for req in waiting:
            req.emit(Event("error", status=503, message="the server is shutting down"))
        for req in {id(s.req): s.req for s in self._active}.values():
            self._fail(req, 503, "the server is shutting down")

    def _fail(self, req: Request, status: int, message: str) -> None:
        self._release(req)
        req.open = 0
        req.emit(Event("error", status=status, message=message))

    def _release(self, req: Request) -> None:
        for s in req.seqs:
            if s in self._active:
                self._active.remove(s)
                self._free.append(s.slot)
        self._free.sort()  # lowest slots first: keeps the busy rows at the front (short steps when not invariant)

    def _reap(self) -> None:
        """Drop cancelled requests and those past their deadline, running or waiting."""
        now = time.monotonic()
        closing = self._drain_at is not None and now > self._drain_at
        with self._cv:
            keep = collections.deque()
            for req in self._waiting:
                if req.cancelled or now > req.deadline or closing:
                    self._queued -= req.n
                    if req.cancelled:
                        self.cancelled += 1
                    elif closing:
                        req.emit(Event("error", status=503, message="the server is shutting down"))
                    else:
                        self.timed_out += 1
                        req.emit(Event("error", status=408, message="request timed out while waiting for a slot "
                                                                    "(the server's --timeout-s)"))
                else:
                    keep.append(req)
            self._waiting = keep
        for req in {id(s.req): s.req for s in self._active}.values():
            if req.cancelled:
                self.cancelled += 1
                self._release(req)
                req.open = 0
            elif closing:
                self._fail(req, 503, "the server is shutting down")
            elif now > req.deadline:
                self.timed_out += 1
                self._fail(req, 408, "request timed out (the server's --timeout-s)")

    def _admit(self) -> None:
        while True:
            with self._cv:
                if not self._waiting or len(self._free) < self._waiting[0].n:
                    return
                req = self._waiting.popleft()
                self._queued -= req.n
            try:
                self._prefill(req)
            except Exception:  # a bug or out of memory: this request fails, the others go on
                log.exception("prefill failed")
                self._fail(req, 500, "internal error while reading the prompt (see the server log)")

    def _prefill(self, req: Request) -> None:
        ids = req.prompt_ids
        P = len(ids)
        cache1 = self.model.new_cache(1, P)
        idx_1P = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits_V = self.model(idx_1P, cache=cache1, last_only=True)[0, -1]
        for i in range(req.n):
            slot = self._free.pop(0)
            seq = _Seq(req, i, slot, self.tokenizer, self.vocab, self.device)
            self.cache.load(slot, cache1, P)
            req.seqs.append(seq)
            self._active.append(seq)
        self._sample(req.seqs, logits_V[None].expand(req.n, -1), rows=list(range(req.n)))

    def _step(self) -> None:
        seqs = list(self._active)
        if self.per_row:
            logits = {}
            for s in seqs:
                pos_1 = torch.tensor([s.pos], device=self.device)
                self.cache.prepare(slice(s.slot, s.slot + 1), pos_1, s.pos + 1)
                tok_11 = torch.tensor([[s.pending]], device=self.device)
                logits[s.slot] = self.model(tok_11, positions_BT=pos_1[:, None], cache=self.cache,
                                            last_only=True)[0, -1]
        else:
            if self.short_steps:
                M, S = max(s.slot for s in seqs) + 1, max(s.pos for s in seqs) + 1
            else:
                M, S = self.slots, self.window
            tok_M = [self.pad_id] * M
            pos_M = [0] * M
            for s in seqs:
                tok_M[s.slot], pos_M[s.slot] = s.pending, s.pos
            tok_M1 = torch.tensor(tok_M, dtype=torch.long, device=self.device)[:, None]
            pos_M = torch.tensor(pos_M, dtype=torch.long, device=self.device)
            self.step_rows = M
            if self.fused is not None:
                # Each row writes at its own position and attends to its slots [0, pos] only; a free row
                # decodes a pad token into slot 0 of its own cache row, which the next prefill overwrites.
                logits = self.fused.rows(tok_M1, self.cache.k, self.cache.v, end_B=pos_M)
            else:
                key_mask_MS = torch.arange(S, device=self.device)[None, :] < pos_M[:, None]
                self.cache.prepare(slice(0, M), pos_M, S)
                logits = self.model(tok_M1, positions_BT=pos_M[:, None], cache=self.cache,
                                    key_mask_BS=key_mask_MS, last_only=True)[:, -1]
        for s in seqs:
            s.pos += 1  # the pending token is in the cache now
        self.steps += 1
        self._sample(seqs, logits, rows=[s.slot for s in seqs])

    def _sample(self, seqs: list[_Seq], logits, rows: list[int]) -> None:
        """Sample each sequence's next token from its row of ``logits`` and report it."""
        toks = []
        for s, r in zip(seqs, rows):
            logits_1V = logits[r][None].float()
            if s.counts_V is not None:
                p = s.req.params
                logits_1V = logits_1V - p.frequency_penalty * s.counts_V - p.presence_penalty * (s.counts_V > 0)
            toks.append(sample_next(logits_1V, s.cfg, None if s.greedy else [s.gen], s.seen_1V))
        toks = torch.cat(toks).tolist() if toks else []
        touched = {}
        for s, t in zip(seqs, toks):
            touched[id(s.req)] = s.req
            self._accept(s, int(t))
        for req in touched.values():
            self._flush(req)

    def _accept(self, s: _Seq, t: int) -> None:
        p = s.req.params
        self.tokens += 1
        reason = None
        if t in p.stop_ids and not p.ignore_eos:
            reason = "stop"
        else:
            s.out.append(t)
            if s.seen_1V is not None:
                s.seen_1V[0, t] = True
            if s.counts_V is not None:
                s.counts_V[t] += 1
            if s.row.token(t):
                reason = "stop"  # a stop string
            elif len(s.out) >= p.max_tokens:
                reason = "length"
            elif s.pos + 1 >= self.window:
                reason = "length"  # prompt + completion fill the context window
        if reason is None:
            s.pending = t
            return
        s.row.finish()
        s.pending = None
        s.reason = reason

    def _flush(self, req: Request) -> None:
        """Send the request's new text, and the end of each choice that ended."""
        for s in req.seqs:
            if s.pieces:
                text, s.pieces[:] = "".join(s.pieces), []
                if text:
                    req.emit(Event("text", index=s.index, text=text))
            if s.pending is None and s in self._active:
                self._active.remove(s)
                self._free.append(s.slot)
                self._free.sort()
                req.open -= 1
                req.emit(Event("finish", index=s.index, reason=s.reason, tokens=len(s.out)))
