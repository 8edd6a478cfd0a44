"""Text generation: sampling, the KV-cache decode loop, stop strings and streaming.

The decode loop (``generate_ids``) runs one prefill forward over the (left-padded) prompts, then one
forward per new token through the preallocated KV cache with ``last_only=True``. Per step it does the
essentials only: one forward, sampling on the device, and one transfer of the new token ids to the host
(needed to notice EOS and to feed callbacks). Without padding (batch 1, or prompts of equal length) no
key mask and no positions are built: the model's default positions and SDPA's causal fast path apply.

Sampling (``sample_next``) applies, in this order: repetition penalty (CTRL, Keskar et al. 2019), greedy
argmax when temperature is 0, temperature, top-k, top-p (nucleus, Holtzman et al. 2020), then draws a
token with the exponential-race form of the Gumbel-max trick: argmax(p / E) with E ~ Exp(1) is a sample
from p. Drawing the noise from one generator per row, each seeded with ``cfg.seed``, makes a row's text
depend only on its prompt and the seed, not on which other prompts share the batch.

The context window (``overflow``), since a model never sees more than ``block_size`` positions:
    "slide"  (default) a prompt longer than the window is cut from the left (with a warning) and, when
             the cache is full, the newest half window is re-encoded from position 0 and generation
             continues, so ``max_new_tokens`` may exceed ``block_size`` (nanoGPT's cropping, amortized).
    "stop"   generation ends with finish reason "length" when the window is full; a prompt that does not
             fit raises UserError.
    "error"  raise UserError before any work when prompt + max_new_tokens > block_size.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from .config import GenerateConfig, UserError

OVERFLOW_MODES = ("slide", "stop", "error")


@dataclass
class GenerationResult:
    text: str
    """Generated text (prompt excluded), cut before the first stop string."""
    token_ids: list[int]
    """Generated token ids (EOS / stop tokens excluded; tokens of a matched stop string included)."""
    finish_reason: str
    """"stop" (EOS, a stop token or a stop string) or "length" (max_new_tokens or the context window)."""
    prompt_tokens: int
    completion_tokens: int


# --------------------------------------------------------------------------------------------------
# Sampling


def make_generators(seed: Optional[int], n: int, device: torch.device | str) -> list[torch.Generator]:
    """One generator per row. With a seed every row uses it (rows are independent of batch makeup);
    without one, seeds come from torch's global RNG (so ``torch.manual_seed`` still reproduces), one
    per row so that identical prompts give different samples."""
    if seed is None:
        base = int(torch.randint(0, 2**62, (1,)).item())
        seeds = [base + i for i in range(n)]
    else:
        seeds = [int(seed)] * n
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(s)
        gens.append(g)
    return gens


def presence_mask(seen: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A bool [B, V] mask from either a bool [B, V] mask or token ids [B, S] (negative ids ignored)."""
    if seen.dtype == torch.bool:
        return seen
    ids = seen.long()
    counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(1, ids.clamp(min=0), (ids >= 0).to(torch.int32))
    return counts > 0


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): a seen token's logit is divided by ``penalty`` when positive
    and multiplied by it when negative, so penalty > 1 always makes it less likely."""
    penalized = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen_BV, penalized, logits_BV)


def filter_logits(logits_BV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the nucleus (the smallest set of most likely tokens whose
    probability reaches top_p; the most likely token is always kept) to -inf."""
    V = logits_BV.shape[-1]
    if 0 < top_k < V:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (keeps rank 0 always).
        drop_sorted = (torch.cumsum(probs_BV, dim=-1) - probs_BV) >= top_p
        drop_BV = torch.zeros_like(drop_sorted).scatter_(1, order_BV, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def sample_next(logits_BV: torch.Tensor, cfg: GenerateConfig,
                generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
                seen_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Choose the next token of each row: [B, V] logits -> [B] token ids (on the logits' device).

    generator: one torch.Generator for the whole batch, a sequence of one per row (what generate_ids
        uses), or None for torch's global RNG. Unused when greedy.
    seen_BS: tokens already in the prompt or generated, for the repetition penalty: a bool [B, V] mask
        or token ids [B, S] (negative ids are padding).
    """
    logits_BV = logits_BV.float()
    if cfg.repetition_penalty != 1.0 and seen_BS is not None:
        logits_BV = apply_repetition_penalty(logits_BV, presence_mask(seen_BS, logits_BV.shape[-1]),
                                             cfg.repetition_penalty)
    if cfg.temperature == 0 or cfg.top_k == 1:
        return torch.argmax(logits_BV, dim=-1)
    logits_BV = filter_logits(logits_BV / cfg.temperature, cfg.top_k, cfg.top_p)
    # Exponential race: argmax_i p_i / E_i, E_i ~ Exp(1), i.e. argmax_i logit_i - log E_i, samples from
    # softmax(logits). The clamp keeps log finite, so a filtered token (-inf) can never win.
    noise_BV = torch.empty_like(logits_BV)
    if generator is None or isinstance(generator, torch.Generator):
        noise_BV.exponential_(generator=generator)
    else:
        if len(generator) != noise_BV.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {noise_BV.shape[0]} rows")
        for row, g in enumerate(generator):
            noise_BV[row].exponential_(generator=g)
    noise_BV.clamp_(min=torch.finfo(noise_BV.dtype).tiny)
    return torch.argmax(logits_BV - noise_BV.log(), dim=-1)


# --------------------------------------------------------------------------------------------------
# The decode loop


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _plan_context(prompts: list[list[int]], max_new: int, block: int, overflow: str) -> list[list[int]]:
    """Apply the context-window policy to the prompts (see the module docstring)."""
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    longest = max(len(p) for p in prompts)
    if overflow == "error" and longest + max_new > block:
        raise UserError(f"prompt ({longest} tokens) + max_new_tokens ({max_new}) exceeds the model's context "
                        f"window (block_size={block}); shorten the prompt or lower max_new_tokens")
    if overflow == "stop" and longest > block:
        raise UserError(f"prompt of {longest} tokens does not fit the model's context window "
                        f"(block_size={block}); shorten the prompt")
    if overflow == "slide" and longest > block:
        keep = max(block - max_new + 1, block // 2, 1)  # room for the new tokens, but keep half a window
        warnings.warn(f"prompt of {longest} tokens is longer than the context window (block_size={block}); "
                      f"keeping its last {keep} tokens", stacklevel=3)
        prompts = [p[-keep:] if len(p) > keep else p for p in prompts]
    return prompts


class _Batch:
    """Decode state of the rows still in the cache: left-padded prefill, key mask, positions."""

    def __init__(self, model, contexts: list[list[int]], rows: list[int], capacity: int, device, pad_id: int,
                 fused=None):
        lens = [len(c) for c in contexts]
        L = max(lens)
        B = len(contexts)
        self.rows = rows  # original prompt index of each cache row
        self.device = device
        self.padded = min(lens) != L
        idx_BL = torch.full((B, L), pad_id, dtype=torch.long)
        for r, c in enumerate(contexts):
            idx_BL[r, L - len(c):] = torch.tensor(c, dtype=torch.long)
        idx_BL = idx_BL.to(device)
        self.cache = model.new_cache(B, capacity)
        self.fused = fused  # lmforge.fused.DecodeStep, or None: the steps run the model's forward
        if self.padded:
            self.mask_BS = torch.ones(B, capacity, dtype=torch.bool, device=device)
            for r, n in enumerate(lens):
                self.mask_BS[r, : L - n] = False
            # Positions count real tokens only; padding slots get 0 (they are masked out anyway).
            pos_BL = (self.mask_BS[:, :L].long().cumsum(-1) - 1).clamp(min=0)
            self.next_pos_B1 = pos_BL[:, -1:] + 1
            self.start_B = torch.tensor([L - n for n in lens], dtype=torch.long, device=device)
            logits = model(idx_BL, positions_BT=pos_BL, cache=self.cache, key_mask_BS=self.mask_BS[:, :L],
                           last_only=True)
        else:
            self.mask_BS = self.next_pos_B1 = self.start_B = None
            logits = model(idx_BL, cache=self.cache, last_only=True)
        self.logits_BV = logits[:, -1]

    def step(self, model, tok_B: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and self.fused.applies(tok_B.shape[0], self.cache):
            logits_BV = self.fused(tok_B, self.cache, self.next_pos_B1, self.start_B)
            if self.padded:
                self.next_pos_B1 = self.next_pos_B1 + 1
            return logits_BV
        if self.padded:
            S = self.cache.length + 1
            logits = model(tok_B[:, None], positions_BT=self.next_pos_B1, cache=self.cache,
                           key_mask_BS=self.mask_BS[:, :S], last_only=True)
            self.next_pos_B1 = self.next_pos_B1 + 1
        else:
            logits = model(tok_B[:, None], cache=self.cache, last_only=True)
        return logits[:, -1]

    def keep(self, keep_rows: list[int]) -> torch.Tensor:
        """Drop finished rows from the cache (argument: cache row indices to keep); returns the index."""
        index = torch.tensor(keep_rows, dtype=torch.long, device=self.device)
        self.cache.select(index)
        if self.padded:
            self.mask_BS = self.mask_BS.index_select(0, index)
            self.next_pos_B1 = self.next_pos_B1.index_select(0, index)
            self.start_B = self.start_B.index_select(0, index)
        self.rows = [self.rows[r] for r in keep_rows]
        return index


@torch.inference_mode()
def generate_ids_with_reasons(model, prompts: list[list[int]], cfg: GenerateConfig, eos_id: Optional[int] = None,
                              stop_ids: Iterable[int] = (), on_token: Optional[Callable[[int, int], bool]] = None,
                              overflow: str = "slide", pad_id: int = 0) -> tuple[list[list[int]], list[str]]:
    """``generate_ids`` that also returns each row's finish reason ("stop" or "length")."""
    cfg.validate()
    model.eval()
    n = len(prompts)
    outs: list[list[int]] = [[] for _ in range(n)]
    reasons = ["length"] * n
    if n == 0:
        return outs, reasons
    V, block = model.cfg.vocab_size, model.cfg.block_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty; give at least one token (a BOS token for unconditional text)")
        if min(p) < 0 or max(p) >= V:
            raise UserError(f"prompt {i} has token ids outside the model's vocabulary [0, {V})")
    max_new = cfg.max_new_tokens
    if max_new == 0:
        return outs, reasons
    prompts = _plan_context([list(p) for p in prompts], max_new, block, overflow)
    device = _device_of(model)
    enders = set(int(t) for t in stop_ids)
    if eos_id is not None:
        enders.add(int(eos_id))

    greedy = cfg.temperature == 0 or cfg.top_k == 1
    gens = None if greedy else make_generators(cfg.seed, n, device)
    seen_BV = None
    if cfg.repetition_penalty != 1.0:
        seen_BV = torch.zeros(n, V, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen_BV[i, torch.tensor(sorted(set(p)), dtype=torch.long, device=device)] = True

    def capacity(ctx_lens: list[int], left: int) -> int:
        # The last sampled token never enters the cache: L + left - 1 slots suffice.
        return max(1, min(block, max(ctx_lens) + left - 1))

    from .fused import decode_step_for

    fused = decode_step_for(model)  # the whole step compiled, where it applies (CPU, fp32 or int8)
    batch = _Batch(model, prompts, list(range(n)), capacity([len(p) for p in prompts], max_new), device, pad_id,
                   fused)
    logits_BV = batch.logits_BV
    done = [False] * n
    n_active = n  # rows not finished (some finished rows may still sit in the cache until compaction)
    for step in range(max_new):
        row_gens = None if greedy else [gens[i] for i in batch.rows]
        tok_B = sample_next(logits_BV, cfg, row_gens, seen_BV)
        toks = tok_B.tolist()
        for r, i in enumerate(batch.rows):
            if done[i]:
                continue
            t = toks[r]
            if t in enders:
                done[i], reasons[i] = True, "stop"
            else:
                outs[i].append(t)
                if on_token is not None and on_token(i, t):
                    done[i], reasons[i] = True, "stop"
            if done[i]:
                n_active -= 1
        if n_active == 0 or step == max_new - 1:
            break
        if seen_BV is not None:
            seen_BV.scatter_(1, tok_B[:, None], True)
        # Compact when at least half the cache rows are finished: at most log2(B) cache copies.
        live = [r for r, i in enumerate(batch.rows) if not done[i]]
        if 2 * len(live) <= len(batch.rows):
            index = batch.keep(live)
            tok_B = tok_B.index_select(0, index)
            if seen_BV is not None:
                seen_BV = seen_BV.index_select(0, index)
        if batch.cache.length >= batch.cache.max_len:
            # The cache is full only when it holds block_size slots: the context window is used up.
            if overflow != "slide":
                for i in batch.rows:
                    done[i] = True  # reason stays "length"
                break
            # Slide: re-encode each row's newest half window from position 0 and go on from there.
            keep = max(1, block // 2)
            left = max_new - step - 1
            ctx = [(prompts[i] + outs[i])[-keep:] for i in batch.rows]
            new = _Batch(model, ctx, batch.rows, capacity([len(c) for c in ctx], left), device, pad_id, fused)
            batch, logits_BV = new, new.logits_BV
        else:
            logits_BV = batch.step(model, tok_B)
    return outs, reasons


def generate_ids(model, prompts: list[list[int]], cfg: GenerateConfig, eos_id: Optional[int] = None,
                 stop_ids: Iterable[int] = (), on_token: Optional[Callable[[int, int], bool]] = None,
                 overflow: str = "slide", pad_id: int = 0) -> list[list[int]]:
    """Generate continuations of a batch of token-id prompts (of any lengths); returns the new ids.

    eos_id / stop_ids: tokens that end a row (finish reason "stop"); they are not included in the output.
    on_token(row, token_id): called for every generated token of every row, in order; returning True
        ends that row (finish reason "stop"), which is how stop strings are implemented.
    overflow: what to do at the context window, "slide", "stop" or "error" (module docstring).
    pad_id: the id used at padding slots (masked out; any valid id works).
    """
    return generate_ids_with_reasons(model, prompts, cfg, eos_id, stop_ids, on_token, overflow, pad_id)[0]


# --------------------------------------------------------------------------------------------------
# Text level: tokenizer, stop strings, streaming


class _TextRow:
    """One row's text as it is generated: incremental decoding, stop-string search and the part that is
    safe to stream (never text at or past a stop string, nor a tail that could begin one)."""

    def __init__(self, tokenizer, stops: list[str], stream: Optional[Callable[[str], None]]):
        from .tokenizer import StreamDecoder

        # Special tokens are left out of generated text, as in the non-streaming path (decode below).
        self.dec = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.stream = stream
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def add(self, piece: str, final: bool = False) -> bool:
        """Append decoded text; True when a stop string appeared (the text is then cut before it)."""
        if piece and not self.stopped:
            start = max(0, len(self.text) - self.longest + 1)
            self.text += piece
            hits = [j for j in (self.text.find(s, start) for s in self.stops) if j >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
        end = len(self.text) if (final or self.stopped) else len(self.text) - self._held_back()
        if self.stream is not None and end > self.emitted:
            self.stream(self.text[self.emitted:end])
            self.emitted = end
        return self.stopped

    def token(self, token_id: int) -> bool:
        return self.add(self.dec.feed(token_id))

    def finish(self) -> str:
        self.add(self.dec.flush(), final=True)
        return self.text


def wants_bos(tokenizer) -> bool:
    """Whether prompts should start with BOS: only when the tokenizer has one and its config says the
    model was trained that way (tokenizer_config.json ``add_bos_token``, as Llama's does). lmforge's own
    tokenizers add no BOS by default."""
    if getattr(tokenizer, "bos_id", None) is None:
        return False
    return bool(getattr(tokenizer, "add_bos_token", False))


def encode_prompt(tokenizer, text: str, add_bos: Optional[bool] = None) -> list[int]:
    """Token ids of a prompt, with BOS per ``wants_bos`` (not doubled when the text, e.g. a rendered chat
    template, already starts with the BOS token). An empty prompt becomes [BOS] (or [EOS], GPT-2's
    document separator) so that unconditional generation has something to condition on."""
    bos = getattr(tokenizer, "bos_id", None)
    if add_bos is None:
        add_bos = wants_bos(tokenizer)
    ids = list(tokenizer.encode(text, add_bos=False))
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    if not ids:
        start = bos if bos is not None else getattr(tokenizer, "eos_id", None)
        if start is None:
            raise UserError("the prompt is empty and the tokenizer has no BOS/EOS token to start from; "
                            "give a prompt")
        ids = [start]
    return ids


def generate_text(model, tokenizer, prompts: list[str], cfg: GenerateConfig,
                  stream: Optional[Callable[[str], None]] = None, *, overflow: str = "slide",
                  add_bos: Optional[bool] = None, stop_ids: Optional[Iterable[int]] = None) -> list[GenerationResult]:
    """Generate continuations of text prompts.

    stream(text_piece): called with each new piece of text as soon as it is final (batch size 1 only);
        the pieces concatenate to the returned text, never split a UTF-8 character and never include a
        stop string or text after it.
    stop_ids: tokens that end generation besides the tokenizer's EOS; by default the tokenizer's
        ``stop_ids`` (EOS and a chat end-of-turn token such as <|im_end|> when the vocabulary has one).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if stream is not None and len(prompts) != 1:
        raise UserError(f"streaming needs exactly one prompt, got {len(prompts)}")
    ids = [encode_prompt(tokenizer, p, add_bos) for p in prompts]
    eos = getattr(tokenizer, "eos_id", None)
    rows: Optional[list[_TextRow]] = None
    on_token: Optional[Callable[[int, int], bool]] = None
    if cfg.stop or stream is not None:
        rows = [_TextRow(tokenizer, list(cfg.stop), stream) for _ in prompts]
        on_token = lambda i, t: rows[i].token(t)  # noqa: E731

    pad = getattr(tokenizer, "pad_id", None)
    if stop_ids is None:
        stop_ids = getattr(tokenizer, "stop_ids", ())
    outs, reasons = generate_ids_with_reasons(model, ids, cfg, eos_id=eos, stop_ids=stop_ids,
                                              on_token=on_token, overflow=overflow,
                                              pad_id=pad if pad is not None and pad < model.cfg.vocab_size else 0)
    results = []
    for i, out in enumerate(outs):
        if rows is not None:
            text = rows[i].finish()
            reason = "stop" if rows[i].stopped else reasons[i]
        else:
            text = tokenizer.decode(out, skip_special_tokens=True)
            reason = reasons[i]
        results.append(GenerationResult(text=text, token_ids=out, finish_reason=reason,
                                        prompt_tokens=len(ids[i]), completion_tokens=len(out)))
    return results


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """Render a conversation ([{"role": ..., "content": ...}, ...]) with the tokenizer's chat template
    (ChatML when it has none), ending with the assistant's turn header so the model answers next."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise UserError("messages must be a list of {'role': ..., 'content': ...} dicts")
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
