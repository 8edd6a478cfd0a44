"""`lmforge chat`: history, streaming, the chat template, /reset and /system, and the context window."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.chat import ChatSession, run_chat
from lmforge.checkpoint import save_checkpoint
from lmforge.config import GenerateConfig, ModelConfig
from lmforge.lm import LM
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> LM:
    tok = Tokenizer.train_from_iterator(["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?\n"], kind="char")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layers=1, n_heads=2, d_model=16, pos="rope",
                      norm="rmsnorm", mlp="swiglu", bias=False)
    path = Path(tmp_path_factory.mktemp("chat")) / "ckpt"
    save_checkpoint(path, build_model(cfg), tokenizer=tok)
    return LM.load(path)


def _session(lm, **gen):
    out: list[str] = []
    s = ChatSession(lm, GenerateConfig(**{"max_new_tokens": 8, "temperature": 0.0, **gen}), write=out.append)
    return s, out


def test_history_template_and_streaming(lm, monkeypatch):
    s, out = _session(lm)
    seen = []
    real_chat = lm.chat

    def spy(messages, **kw):
        seen.append([dict(m) for m in messages])
        return real_chat(messages, **kw)

    monkeypatch.setattr(lm, "chat", spy)
    a1 = s.handle("hello")
    a2 = s.handle("again")
    assert seen[1] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": a1},
                       {"role": "user", "content": "again"}]
    assert s.history[-1] == {"role": "assistant", "content": a2}
    # What streamed is exactly the answer (pieces, then a newline).
    assert "".join(out) == a1 + "\n" + a2 + "\n"
    # The prompt is the chat template's rendering, ending with the assistant header.
    prompt = lm.tokenizer.apply_chat_template(seen[1], add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>user\nhello<|im_end|>") and prompt.endswith("<|im_start|>assistant\n")


def test_reset_and_system_commands(lm, monkeypatch):
    s, out = _session(lm)
    seen = []
    monkeypatch.setattr(lm, "chat", lambda messages, **kw: seen.append(list(messages)) or "ok")
    s.handle("hi")
    assert s.handle("/system be brief") is None
    assert s.system == "be brief" and "[system message set]\n" in out
    s.handle("next")
    assert seen[-1][0] == {"role": "system", "content": "be brief"} and len(seen[-1]) == 4
    s.handle("/reset")
    assert s.history == [] and "[history cleared]\n" in out
    s.handle("fresh")
    assert seen[-1] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "fresh"}]
    s.handle("/system")
    assert s.system is None
    s.handle("/bogus")
    assert any("unknown command /bogus" in o for o in out)
    with pytest.raises(EOFError):
        s.handle("/quit")


def test_context_window_drops_oldest_turns_with_a_notice(lm, monkeypatch):
    s, out = _session(lm, max_new_tokens=16)
    monkeypatch.setattr(lm, "chat", lambda messages, **kw: "sure thing")
    s.system = "sys"
    for i in range(6):
        s.handle(f"message number {i} here")
    notices = [o for o in out if o.startswith("[context window full")]
    assert notices, out
    # The newest turn is kept, the oldest ones are gone, roles still alternate, the system message stays.
    assert s.history[-2]["content"] == "message number 5 here"
    assert all(m["content"] != "message number 0 here" for m in s.history)
    assert s.history[0]["role"] == "user"
    assert s.prompt_tokens(s.messages()) <= lm.model.cfg.block_size - 16
    assert s.messages()[0] == {"role": "system", "content": "sys"}
    s.handle("x" * 200)  # a message longer than the whole window is refused, not sent
    assert "message too long" in out[-1] and s.history[-1]["content"] == "sure thing"


def test_answer_budget_is_capped_to_half_the_window(lm):
    s, out = _session(lm, max_new_tokens=500)
    assert s.gen.max_new_tokens == lm.model.cfg.block_size // 2
    assert "limited to 48 tokens" in out[0]


def test_run_chat_loop(lm):
    lines = iter(["hello", "/reset", "/quit"])
    out: list[str] = []
    run_chat(lm, GenerateConfig(max_new_tokens=4, temperature=0.0), read=lambda _p: next(lines), write=out.append)
    text = "".join(out)
    assert text.startswith("chatting with") and "model> " in text and "[history cleared]" in text
