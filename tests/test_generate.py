"""Generation: sampling, the KV-cache decode loop, stop handling, streaming, the LM API."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import GenerateConfig, ModelConfig, UserError
from lmforge.generate import (apply_repetition_penalty, encode_prompt, filter_logits, generate_ids,
                              generate_ids_with_reasons, generate_text, sample_next)
from lmforge.lm import LM
from lmforge.models.decoder import DecoderLM
from lmforge.models.layers import KVCache
from lmforge.tokenizer import Tokenizer

POS_TYPES = ["learned", "sinusoidal", "rope", "alibi"]
GREEDY = GenerateConfig(max_new_tokens=12, temperature=0.0)

# English only: Chinese characters and emoji stay split into several byte tokens each.
CORPUS = ["The quick brown fox jumps over the lazy dog. Hello world, hello there!\n"] * 10


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(CORPUS, "bpe", vocab_size=280, min_frequency=1)


def tiny(pos="rope", vocab_size=64, init_std=0.5, **kw) -> DecoderLM:
    """A random model whose greedy continuations vary (large init), so comparisons mean something."""
    base = dict(vocab_size=vocab_size, block_size=48, n_layers=2, n_heads=4, d_model=32, pos=pos,
                init_std=init_std, tie_embeddings=False)
    base.update(kw)
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(**base)).eval()


def greedy_reference(model, prompt, n):
    """Greedy decoding by repeated full forwards (no cache)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


class ScriptedLM(nn.Module):
    """A stand-in model that emits a fixed continuation: after ``prompt_len`` tokens, the k-th generated
    token is script[k] (chosen from the position, so it works with the decode loop's cache)."""

    def __init__(self, script, prompt_len, vocab_size, block_size=256):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layers=1, n_heads=1, d_model=8)
        self.script, self.prompt_len = list(script), prompt_len
        self.anchor = nn.Parameter(torch.zeros(1))
        self.calls = []

    def new_cache(self, batch, max_len=None):
        return KVCache(0, batch, 1, max_len or self.cfg.block_size, 1, "cpu", torch.float32)

    def forward(self, idx_BT, positions_BT=None, cache=None, key_mask_BS=None, last_only=False, **_):
        B, T = idx_BT.shape
        past = cache.length if cache is not None else 0
        self.calls.append(T)
        if positions_BT is None:
            positions_BT = torch.arange(past, past + T).expand(B, T)
        if cache is not None:
            cache.advance(T)
        logits = torch.zeros(B, 1, self.cfg.vocab_size)
        for b in range(B):
            k = int(positions_BT[b, -1]) + 1 - self.prompt_len
            logits[b, 0, self.script[min(k, len(self.script) - 1)]] = 10.0
        return logits


# --------------------------------------------------------------------------------------------------
# Sampling


def test_repetition_penalty_changes_logits_exactly_as_specified():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0, 0.0]]
    # through sample_next, with seen given as token ids (negative = padding): token 0 loses to token 2
    cfg = GenerateConfig(temperature=0, repetition_penalty=5.0)
    assert sample_next(torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0]]), cfg, None, torch.tensor([[0, -1]])).item() == 2
    assert sample_next(logits, GenerateConfig(temperature=0), None, torch.tensor([[0]])).item() == 0


def test_repetition_penalty_in_the_loop_avoids_repeats():
    model = tiny("rope", init_std=0.02)  # a near-uniform model with a degenerate greedy loop
    plain = generate_ids(model, [[1, 2, 3]], GenerateConfig(max_new_tokens=20, temperature=0))[0]
    penal = generate_ids(model, [[1, 2, 3]], GenerateConfig(max_new_tokens=20, temperature=0,
                                                             repetition_penalty=1e6))[0]
    assert len(set(plain)) < len(plain)
    assert len(set(penal)) == len(penal) and not set(penal) & {1, 2, 3}


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    keep = lambda t: torch.isfinite(t)[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.5)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.4)) == [True, False, False, False]  # 0.4 already reaches p
    assert keep(filter_logits(logits, top_p=0.75)) == [True, True, True, False]
    assert keep(filter_logits(logits, top_p=1e-9)) == [True, False, False, False]
    # unsorted input: positions are restored
    shuffled = logits[:, [2, 0, 3, 1]]
    assert keep(filter_logits(shuffled, top_p=0.5)) == [False, True, False, True]


def test_sampling_follows_the_softmax_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().expand(20000, 4) * 2.0  # temperature 2 undoes the doubling
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, GenerateConfig(temperature=2.0), g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    # top-k=2 renormalizes over the two kept tokens
    draws = sample_next(logits, GenerateConfig(temperature=2.0, top_k=2), g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.015, rtol=0)


# --------------------------------------------------------------------------------------------------
# The decode loop


@pytest.mark.parametrize("pos", POS_TYPES)
def test_greedy_cache_decode_equals_repeated_full_forwards(pos):
    model = tiny(pos, n_kv_heads=2)
    prompt = [5, 9, 3, 17]
    out = generate_ids(model, [prompt], GREEDY)[0]
    assert out == greedy_reference(model, prompt, 12)
    assert len(set(out)) >= 2  # a non-trivial continuation
    assert generate_ids(model, [prompt], GREEDY)[0] == out  # deterministic


@pytest.mark.parametrize("pos", POS_TYPES)
def test_batched_prompts_of_different_lengths_equal_one_at_a_time(pos):
    model = tiny(pos, n_kv_heads=1)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10], [11, 12, 13], [4, 4]]
    batch = generate_ids(model, prompts, GREEDY)
    assert batch == [generate_ids(model, [p], GREEDY)[0] for p in prompts]
    assert batch[0] == greedy_reference(model, prompts[0], 12)


def test_batched_rows_finishing_early_are_dropped_without_changing_others(monkeypatch):
    import lmforge.generate as gen

    compactions = []
    keep = gen._Batch.keep
    monkeypatch.setattr(gen._Batch, "keep", lambda self, rows: compactions.append(rows) or keep(self, rows))
    model = tiny("rope")
    prompts = [[1, 2, 3], [7, 8], [20, 21, 22, 23], [30]]
    ref = [greedy_reference(model, p, 12) for p in prompts]
    eos = ref[1][2]  # row 1 stops at its third token; others may too, wherever this id comes up
    outs, reasons = generate_ids_with_reasons(model, prompts, GREEDY, eos_id=eos)
    for r, o, why in zip(ref, outs, reasons):
        expect = r[: r.index(eos)] if eos in r else r
        assert o == expect
        assert why == ("stop" if eos in r else "length")
    assert compactions == [[2, 3]]  # rows 0 and 1 stopped early and left the cache


def test_seed_reproducibility():
    model = tiny("rope", init_std=0.02)  # nearly flat next-token distributions
    cfg = lambda seed: GenerateConfig(max_new_tokens=16, temperature=1.0, seed=seed)  # noqa: E731
    a = generate_ids(model, [[1, 2, 3]], cfg(1))[0]
    assert generate_ids(model, [[1, 2, 3]], cfg(1))[0] == a
    assert generate_ids(model, [[1, 2, 3]], cfg(2))[0] != a
    # a row's sample does not depend on which other prompts share the batch
    batch = generate_ids(model, [[9, 9, 9, 9, 9, 9], [1, 2, 3], [4]], cfg(1))
    assert batch[1] == a
    # without a seed, torch.manual_seed reproduces, and identical prompts in a batch differ
    torch.manual_seed(5)
    b = generate_ids(model, [[1, 2, 3], [1, 2, 3]], cfg(None))
    torch.manual_seed(5)
    assert generate_ids(model, [[1, 2, 3], [1, 2, 3]], cfg(None)) == b
    assert b[0] != b[1]


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny("alibi")
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    greedy = generate_ids(model, prompts, GREEDY)
    for seed in (0, 1):
        assert generate_ids(model, prompts, GenerateConfig(max_new_tokens=12, temperature=1.5, top_k=1,
                                                           seed=seed)) == greedy
        assert generate_ids(model, prompts, GenerateConfig(max_new_tokens=12, temperature=1.5, top_p=1e-6,
                                                           seed=seed)) == greedy


def test_eos_stops_a_row_and_is_not_included():
    model = tiny("learned")
    ref = greedy_reference(model, [1, 2, 3], 12)
    eos = ref[4]
    outs, reasons = generate_ids_with_reasons(model, [[1, 2, 3]], GREEDY, eos_id=eos)
    assert outs[0] == ref[: ref.index(eos)] and reasons == ["stop"]
    outs, reasons = generate_ids_with_reasons(model, [[1, 2, 3]], GREEDY, stop_ids=[eos])
    assert outs[0] == ref[: ref.index(eos)] and reasons == ["stop"]


def test_max_new_tokens_respected():
    model = tiny("rope")
    for n in (0, 1, 7):
        outs, reasons = generate_ids_with_reasons(model, [[1], [2, 3]], GenerateConfig(max_new_tokens=n, temperature=0))
        assert [len(o) for o in outs] == [n, n] and reasons == ["length", "length"]
    scripted = ScriptedLM([7] * 50, prompt_len=2, vocab_size=16)
    generate_ids(scripted, [[1, 2]], GenerateConfig(max_new_tokens=5, temperature=0))
    assert scripted.calls == [2, 1, 1, 1, 1]  # one prefill, then one token per step, none wasted


def test_empty_prompt_and_bad_ids_are_user_errors():
    model = tiny("rope")
    with pytest.raises(UserError, match="empty"):
        generate_ids(model, [[]], GREEDY)
    with pytest.raises(UserError, match="vocabulary"):
        generate_ids(model, [[1, 999]], GREEDY)


# --------------------------------------------------------------------------------------------------
# Context window


def test_block_size_overflow_error_and_stop_modes():
    model = tiny("learned")  # block_size 48
    prompt = list(range(1, 41))  # 40 tokens
    cfg = GenerateConfig(max_new_tokens=20, temperature=0)
    with pytest.raises(UserError, match="block_size=48"):
        generate_ids(model, [prompt], cfg, overflow="error")
    outs, reasons = generate_ids_with_reasons(model, [prompt], cfg, overflow="stop")
    assert len(outs[0]) == 48 - 40 + 1 and reasons == ["length"]  # every position of the window used
    assert outs[0] == greedy_reference(model, prompt, 9)
    with pytest.raises(UserError, match="does not fit"):
        generate_ids(model, [list(range(1, 60))], cfg, overflow="stop")


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_block_size_slide_mode_matches_a_windowed_reference_and_never_exceeds_the_window(pos):
    model = tiny(pos, block_size=16)
    seen_positions = []
    forward = model.forward

    def spy(idx, positions_BT=None, cache=None, **kw):
        past = cache.length if cache is not None else 0
        top = int(positions_BT.max()) if positions_BT is not None else past + idx.shape[1] - 1
        seen_positions.append(max(top, past + idx.shape[1] - 1))
        return forward(idx, positions_BT=positions_BT, cache=cache, **kw)

    model.forward = spy
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    out = generate_ids(model, [prompt], GenerateConfig(max_new_tokens=40, temperature=0))[0]
    assert len(out) == 40 and max(seen_positions) < 16
    # reference: the context grows to the window, then restarts from its newest half (block_size // 2)
    model.forward = forward
    seq, start = list(prompt), 0
    with torch.no_grad():
        for _ in range(40):
            if len(seq) - start > 16:
                start = len(seq) - 8
            seq.append(int(model(torch.tensor([seq[start:]]))[0, -1].argmax()))
    assert out == seq[len(prompt):]
    # a prompt longer than the window is cut from the left with a warning
    with pytest.warns(UserWarning, match="keeping its last"):
        out = generate_ids(model, [list(range(1, 40))], GenerateConfig(max_new_tokens=4, temperature=0))[0]
    assert out == greedy_reference(model, list(range(1, 40))[-13:], 4)


# --------------------------------------------------------------------------------------------------
# Text level: stop strings, streaming, BOS


def scripted_text_model(tok, prompt: str, continuation: str, then: list[int] = ()):
    script = tok.encode(continuation) + list(then) + [tok.eos_id]
    return ScriptedLM(script, prompt_len=len(tok.encode(prompt)), vocab_size=tok.vocab_size)


def test_streaming_pieces_concatenate_to_the_text_with_chinese_and_emoji(tok):
    text = "你好，世界！🙂🚀 naïve café — ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters really are split over several tokens
    model = scripted_text_model(tok, "Hi", text)
    pieces = []
    res = generate_text(model, tok, ["Hi"], GenerateConfig(max_new_tokens=200, temperature=0), stream=pieces.append)[0]
    assert "".join(pieces) == res.text == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5
    assert res.finish_reason == "stop" and res.token_ids == ids
    assert res.prompt_tokens == len(tok.encode("Hi")) and res.completion_tokens == len(ids)
    # the same text without streaming
    res2 = generate_text(model, tok, ["Hi"], GenerateConfig(max_new_tokens=200, temperature=0))[0]
    assert res2.text == text and res2.token_ids == ids


def test_stop_strings_cut_the_output_and_are_never_streamed(tok):
    text = "one two\nthree\n\nfour five"
    model = scripted_text_model(tok, "x", text)
    pieces = []
    cfg = GenerateConfig(max_new_tokens=200, temperature=0, stop=["\n\n", "five"])
    res = generate_text(model, tok, ["x"], cfg, stream=pieces.append)[0]
    assert res.text == "one two\nthree" and res.finish_reason == "stop"
    assert "".join(pieces) == res.text
    # generation stopped right after the stop string was complete, not at EOS
    assert len(res.token_ids) < len(tok.encode(text))
    # a stop string across token boundaries, partially matching first ("fo" of "four" vs "fox")
    model = scripted_text_model(tok, "x", "a fox and four dogs")
    pieces = []
    res = generate_text(model, tok, ["x"], GenerateConfig(max_new_tokens=200, temperature=0, stop=["four"]),
                        stream=pieces.append)[0]
    assert res.text == "a fox and " == "".join(pieces)
    # batched text generation with stop strings, rows stopping at different places
    m2 = scripted_text_model(tok, "x", "ab. cd. ef")
    outs = generate_text(m2, tok, ["x", "x"], GenerateConfig(max_new_tokens=200, temperature=0, stop=["d."]))
    assert [o.text for o in outs] == ["ab. c", "ab. c"]


def test_stream_requires_a_single_prompt(tok):
    model = scripted_text_model(tok, "x", "abc")
    with pytest.raises(UserError, match="one prompt"):
        generate_text(model, tok, ["x", "y"], GREEDY, stream=print)


def test_chat_end_token_stops_generation(tok):
    im_end = tok.token_to_id("<|im_end|>")
    model = scripted_text_model(tok, "x", "Hello!", then=[im_end, *tok.encode(" more")])
    res = generate_text(model, tok, ["x"], GenerateConfig(max_new_tokens=50, temperature=0))[0]
    assert res.text == "Hello!" and res.finish_reason == "stop"


def test_bos_follows_the_tokenizer_config(tok):
    assert encode_prompt(tok, "hello") == tok.encode("hello")  # lmforge tokenizers: no BOS
    tok2 = Tokenizer.train_from_iterator(CORPUS, "bpe", vocab_size=280, min_frequency=1)
    tok2.add_bos_token = True
    assert encode_prompt(tok2, "hello") == [tok2.bos_id] + tok2.encode("hello")
    assert encode_prompt(tok2, "<|bos|>hello") == [tok2.bos_id] + tok2.encode("hello")  # not doubled
    assert encode_prompt(tok, "") == [tok.bos_id]  # unconditional generation starts from BOS


# --------------------------------------------------------------------------------------------------
# The LM API


def test_lm_api_generate_chat_logits_perplexity_save_load(tok, tmp_path):
    model = tiny("rope", vocab_size=tok.vocab_size, init_std=0.1, block_size=64)
    lm = LM(model, tok)
    assert lm.num_params == model.num_params() and lm.config is model.cfg
    a = lm.generate("Hello", max_new_tokens=10, temperature=0)
    assert isinstance(a, str)
    assert lm.generate(["Hello", "The quick"], max_new_tokens=10, temperature=0)[0] == a
    s1 = lm.generate("Hello", max_new_tokens=10, temperature=1.0, seed=3)
    assert s1 == lm.generate("Hello", max_new_tokens=10, temperature=1.0, seed=3)
    pieces = []
    assert lm.generate("Hello", max_new_tokens=10, temperature=0, stream=pieces.append) == "".join(pieces) == a
    reply = lm.chat([{"role": "user", "content": "hi"}], max_new_tokens=5, temperature=0)
    assert isinstance(reply, str)
    # logits and perplexity against a direct computation
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    logits = lm.logits(text)
    assert logits.shape == (len(ids), tok.vocab_size)
    nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    assert lm.perplexity(text) == pytest.approx(math.exp(nll.item()), rel=1e-4)
    long_text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    assert len(tok.encode(long_text)) > 64
    assert math.isfinite(lm.perplexity(long_text))
    with pytest.raises(UserError, match="block_size"):
        lm.logits(long_text)
    # save -> load round trip gives the same text
    lm.save(tmp_path / "ckpt")
    lm2 = LM.load(tmp_path / "ckpt")
    assert lm2.generate("Hello", max_new_tokens=10, temperature=0) == a
    assert lm2.name == "ckpt"


def test_lm_without_tokenizer_is_a_user_error():
    with pytest.raises(UserError, match="tokenizer"):
        LM(tiny("rope")).generate("hi")


def test_import_lmforge_is_light():
    code = ("import sys, lmforge; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(lmforge.__version__); lmforge.GenerateConfig; assert 'torch' not in sys.modules; "
            "assert lmforge.LM.__name__ == 'LM'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
