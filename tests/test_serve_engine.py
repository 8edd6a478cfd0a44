"""The continuous-batching engine in process (no HTTP): its slot cache decodes like a plain forward pass
for every position encoding, a seeded request gives the same tokens alone or in any batch, and
cancellation, deadlines, n choices, stop strings and the context window behave."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from lmforge import kernels
from lmforge.config import ModelConfig
from lmforge.lm import prepare_for_inference
from lmforge.models.decoder import DecoderLM
from lmforge.serve.engine import Engine, QueueFull, Request, SamplingParams
from lmforge.tokenizer import Tokenizer

CORPUS = ["Hello world! The quick brown fox jumps over the lazy dog. To be, or not to be.\n"] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(CORPUS, "bpe", vocab_size=300, min_frequency=1)


def tiny(tok, pos="rope", init_std=0.02, block_size=96, layout="plain", **kw) -> DecoderLM:
    """layout: "plain" (nn.Linear: the engine runs the model's forward), or "fp32" / "int8": laid out for
    inference as LM.load does, where the engine decodes through the compiled step (lmforge.fused)."""
    cfg = dict(vocab_size=tok.vocab_size, block_size=block_size, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32,
               pos=pos, init_std=init_std, tie_embeddings=False)
    cfg.update(kw)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**cfg)).eval()
    if layout == "plain":
        return model
    if not kernels.kernel_available():
        pytest.skip("lmforge's CPU kernels could not be built")
    return prepare_for_inference(model, "none" if layout == "fp32" else layout)


LAYOUTS = ["plain", "fp32", "int8"]


class Collector:
    """Runs requests through an engine and gathers (tokens-as-text, finish reason) per choice."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def run(self, jobs: list[tuple[list[int], SamplingParams, int]], deadline_s: float = 60) -> list:
        results, lock, done = {}, threading.Lock(), threading.Event()
        total = sum(n for _, _, n in jobs)

        def emitter(j):
            texts = {}

            def emit(ev):
                with lock:
                    if ev.kind == "text":
                        texts[ev.index] = texts.get(ev.index, "") + ev.text
                        return
                    key = (j, ev.index) if ev.kind == "finish" else (j, "error")
                    results[key] = (texts.get(ev.index, ""), ev.reason or ev.message, ev.tokens or ev.status)
                    if len(results) >= total or ev.kind == "error":
                        done.set()
            return emit

        reqs = [self.engine.submit(Request(ids, n, p, emitter(j), time.monotonic() + deadline_s))
                for j, (ids, p, n) in enumerate(jobs)]
        assert done.wait(120), "engine did not finish"
        self.reqs = reqs
        return [results.get((j, i), results.get((j, "error"))) for j, (_, _, n) in enumerate(jobs) for i in range(n)]


def greedy_reference(model, ids, n):
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope", "alibi"])
@pytest.mark.parametrize("invariant", [True, False])
def test_slot_cache_decodes_like_a_full_forward(tok, pos, invariant, layout):
    """Greedy decoding through the slot cache, with several requests of different lengths sharing the
    batch, gives the tokens of repeated full forward passes (peaked random model: no near ties), through
    the model's forward or through the compiled step."""
    model = tiny(tok, pos, init_std=0.5, layout=layout)
    engine = Engine(model, tok, max_batch=4, batch_invariant=invariant).start()
    assert (engine.fused is not None) == (layout != "plain" and pos in ("learned", "rope"))
    try:
        prompts = [tok.encode(t) for t in ("Hello", "The quick brown fox", "To be", "lazy dog. To be, or not")]
        jobs = [(p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), 1) for p in prompts]
        got = Collector(engine).run(jobs + jobs[:2])  # 6 requests, 4 slots: the last two join later
        for (ids, _, _), (text, reason, n) in zip(jobs + jobs[:2], got):
            assert reason == "length" and n == 12
            assert text == tok.decode(greedy_reference(model, ids, 12), skip_special_tokens=True)
    finally:
        engine.stop()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_seeded_sampling_does_not_depend_on_the_batch(tok, layout):
    """A nearly uniform model (the hardest case) samples the same text for a seed alone, in a full batch
    and in a queue, in batch-invariant mode: bit-identical arithmetic for each row, through the model's
    forward or through the compiled step."""
    model = tiny(tok, "rope", init_std=0.02, layout=layout)
    engine = Engine(model, tok, max_batch=8).start()
    assert (engine.fused is None) == (layout == "plain")
    # The compiled step runs only the busy slots (its rows do not depend on each other); the forward, all.
    assert engine.short_steps == (layout != "plain")
    try:
        c = Collector(engine)
        prompts = [tok.encode("Hello " * (i % 5) + str(i)) for i in range(20)]
        params = [SamplingParams(max_tokens=20 + i % 7, temperature=1.0, top_p=0.95 if i % 2 else 1.0, seed=i,
                                 top_k=50 if i % 3 == 0 else 0) for i in range(20)]
        alone = [c.run([(p, s, 1)])[0] for p, s in zip(prompts, params)]
        assert engine.step_rows == (8 if layout == "plain" else 1)
        together = c.run([(p, s, 1) for p, s in zip(prompts, params)])
        assert alone == together
        assert len({a[0] for a in alone}) == 20
    finally:
        engine.stop()


def test_n_choices_use_consecutive_seeds(tok):
    engine = Engine(tiny(tok), tok, max_batch=4).start()
    try:
        c = Collector(engine)
        p = tok.encode("Hello")
        params = lambda seed: SamplingParams(max_tokens=10, temperature=1.0, seed=seed, ignore_eos=True)  # noqa: E731
        three = c.run([(p, params(7), 3)])
        assert three == [c.run([(p, params(7 + i), 1)])[0] for i in range(3)]
        assert len({t for t, _, _ in three}) == 3
    finally:
        engine.stop()


def test_stop_strings_context_window_and_eos(tok):
    model = tiny(tok, init_std=0.5)
    engine = Engine(model, tok, max_batch=2, max_context=40).start()
    try:
        c = Collector(engine)
        ids = tok.encode("Hello")
        greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
        (full, reason, n), = c.run([(ids, greedy, 1)])
        assert reason == "length" and n == 30
        stop = full[3:5]
        (cut, reason, _), = c.run([(ids, SamplingParams(max_tokens=30, temperature=0.0, stop=[stop]), 1)])
        assert cut == full[: full.index(stop)] and reason == "stop"
        # The window (40) ends a request that asked for more than the room left.
        (_, reason, n), = c.run([(ids, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True), 1)])
        assert reason == "length" and n == 40 - len(ids)
        # A stop token ends the choice and is not counted or shown.
        first = tok.encode(full)[0] if full else None
        if first is not None:
            (text, reason, n), = c.run([(ids, SamplingParams(max_tokens=30, temperature=0.0,
                                                             stop_ids=frozenset({first})), 1)])
            assert (text, reason, n) == ("", "stop", 0)
    finally:
        engine.stop()


def test_cancel_deadline_queue_and_drain(tok):
    engine = Engine(tiny(tok, block_size=512), tok, max_batch=2, max_queue=2).start()
    try:
        events = []
        long = SamplingParams(max_tokens=500, temperature=1.0, ignore_eos=True)
        deadline = time.monotonic() + 20
        r1 = engine.submit(Request(tok.encode("Hello"), 2, long, events.append, time.monotonic() + 60))
        while engine.stats()["active"] < 2:  # r1's two choices hold both slots
            assert time.monotonic() < deadline
            time.sleep(0.005)
        r2 = engine.submit(Request(tok.encode("Hello"), 1, long, events.append, time.monotonic() + 0.2))
        with pytest.raises(QueueFull) as e:  # r2 waits; 2 more would make 3 > max_queue
            engine.submit(Request(tok.encode("x"), 2, long, events.append, time.monotonic() + 60))
        assert e.value.status == 429
        while not any(ev.kind == "error" for ev in events):  # r2 times out while r1 holds both slots
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert [ev.status for ev in events if ev.kind == "error"] == [408]
        r1.cancel()
        while engine.stats()["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stats = engine.stats()
        assert stats["cancelled"] == 1 and stats["timed_out"] == 1 and stats["waiting"] == 0
        assert not any(ev.kind == "finish" for ev in events)
        # Draining: running requests get the grace period, then an error; new ones are refused.
        events.clear()
        engine.submit(Request(tok.encode("Hello"), 1, long, events.append, time.monotonic() + 60))
        engine.drain(0.0)
        with pytest.raises(QueueFull) as e:
            engine.submit(Request(tok.encode("x"), 1, long, events.append, time.monotonic() + 60))
        assert e.value.status == 503
        while not any(ev.kind == "error" for ev in events):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert events[-1].status == 503 and engine.stats()["active"] == 0
        assert r2 is not None
    finally:
        engine.stop()


def test_more_slots_than_the_compiled_step_takes_fall_back_to_the_forward(tok):
    from lmforge.kernels import MAX_ROWS, MAX_ROWS_INT8

    for layout, rows in (("fp32", MAX_ROWS), ("int8", MAX_ROWS_INT8)):
        model = tiny(tok, init_std=0.5, layout=layout)
        assert Engine(model, tok, max_batch=rows).fused is not None
        engine = Engine(model, tok, max_batch=rows + 1).start()
        try:
            assert engine.fused is None and not engine.stats()["compiled_step"]
            ids = tok.encode("To be")
            (text, reason, n), = Collector(engine).run([(ids, SamplingParams(max_tokens=6, temperature=0.0,
                                                                             ignore_eos=True), 1)])
            assert text == tok.decode(greedy_reference(model, ids, 6), skip_special_tokens=True)
        finally:
            engine.stop()


def test_full_steps_where_the_kernels_rows_are_not_independent(tok, monkeypatch):
    """If the product kernels' rows could differ with the batch, a batch-invariant engine runs every slot."""
    model = tiny(tok, init_std=0.5, layout="fp32")
    assert Engine(model, tok, max_batch=4).short_steps
    monkeypatch.setattr("lmforge.kernels.rows_are_independent", lambda: False)
    engine = Engine(model, tok, max_batch=4).start()
    try:
        assert engine.fused is not None and not engine.short_steps
        ids = tok.encode("To be")
        (text, _, _), = Collector(engine).run([(ids, SamplingParams(max_tokens=6, temperature=0.0,
                                                                    ignore_eos=True), 1)])
        assert engine.step_rows == 4
        assert text == tok.decode(greedy_reference(model, ids, 6), skip_special_tokens=True)
    finally:
        engine.stop()
    assert Engine(model, tok, max_batch=4, batch_invariant=False).short_steps
