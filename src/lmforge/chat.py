"""`lmforge chat MODEL`: a terminal dialogue.

The conversation is rendered with the model's chat template (ChatML for a model without one), the
answer streams token by token, and the context window is managed: when the rendered conversation
plus room for the answer no longer fits the model's context, the oldest turns are dropped (the system
message stays) and a notice says so.

Commands: /reset clears the history, /system TEXT sets the system message, /quit (or Ctrl-D) leaves.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

from .config import GenerateConfig


class ChatSession:
    def __init__(self, lm, gen: GenerateConfig, system: Optional[str] = None,
                 write: Callable[[str], None] = None):
        self.lm = lm
        self.gen = gen
        self.system = system
        self.history: list[dict] = []
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def prompt_tokens(self, messages: list[dict]) -> int:
        tok = self.lm.tokenizer
        return len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True)))

    def fit_context(self) -> int:
        """Drop the oldest turns until prompt + answer fit the context; returns how many were dropped."""
        limit = self.lm.model.cfg.block_size - self.gen.max_new_tokens
        if limit < 1:
            raise ValueError("max_new_tokens leaves no room for the prompt in the context window")
        dropped = 0
        while self.prompt_tokens(self.messages()) > limit and len(self.history) > 1:
            # Drop a whole exchange (user + assistant) at a time so roles keep alternating.
            n = 2 if len(self.history) >= 3 and self.history[1]["role"] == "assistant" else 1
            del self.history[:n]
            dropped += n
        return dropped

    def handle(self, line: str) -> Optional[str]:
        """Process one input line; returns the assistant's answer, or None for a command."""
        text = line.strip()
        if text in ("/quit", "/exit"):
            raise EOFError
        if text == "/reset":
            self.history.clear()
            self.write("[history cleared]\n")
            return None
        if text.startswith("/system"):
            self.system = text[len("/system"):].strip() or None
            self.write(f"[system message {'set' if self.system else 'removed'}]\n")
            return None
        if not text:
            return None
        self.history.append({"role": "user", "content": text})
        dropped = self.fit_context()
        if dropped:
            self.write(f"[context window full: dropped the {dropped} oldest message(s)]\n")
        if self.prompt_tokens(self.messages()) > self.lm.model.cfg.block_size - self.gen.max_new_tokens:
            self.history.pop()
            self.write("[message too long for the context window]\n")
            return None
        opts = {k: getattr(self.gen, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                   "repetition_penalty", "stop", "seed")}
        answer = self.lm.chat(self.messages(), stream=self.write, **opts)
        self.write("\n")
        self.history.append({"role": "assistant", "content": answer})
        return answer


def run_chat(lm, gen: GenerateConfig, system: Optional[str] = None, read: Callable[[str], str] = input) -> None:
    session = ChatSession(lm, gen, system)
    print(f"chatting with {lm.name} (context {lm.model.cfg.block_size} tokens). /reset, /system TEXT, /quit")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        try:
            if line.strip() and not line.strip().startswith("/"):
                sys.stdout.write("model> ")
            session.handle(line)
        except EOFError:
            return
