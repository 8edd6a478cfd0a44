"""`lmforge chat MODEL`: a terminal dialogue.

The conversation is rendered with the model's chat template (ChatML for a model without one), the
answer streams token by token, and the context window is managed: when the rendered conversation
plus room for the answer no longer fits the model's context, the oldest turns are dropped (the system
message stays) and a notice says so. The room kept for an answer is max_new_tokens, at most half the
context window (a notice says when it is lowered).

Commands: /reset clears the history, /system TEXT sets the system message (/system alone removes it),
/help lists the commands, /quit (or Ctrl-D) leaves. Ctrl-C while the model answers stops that answer
(what was said so far stays in the history); Ctrl-C at the prompt leaves.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Optional

from .config import GenerateConfig, UserError

HELP = "commands: /reset (clear the history), /system TEXT (set the system message; /system alone removes it), " \
       "/help, /quit"


class ChatSession:
    """The state of one dialogue: the system message, the history, and the context budget."""

    def __init__(self, lm, gen: GenerateConfig, system: Optional[str] = None,
                 write: Optional[Callable[[str], None]] = None):
        self.lm = lm
        self.system = system
        self.history: list[dict] = []
        self.write = write or _stdout
        block = lm.model.cfg.block_size
        if block < 4:
            raise UserError(f"the model's context window ({block} tokens) is too small to chat")
        budget = min(gen.max_new_tokens, block // 2)
        if budget < 1:
            raise UserError("max_new_tokens: must be >= 1 to chat")
        if budget < gen.max_new_tokens:
            self.write(f"[answers are limited to {budget} tokens: half the context window of {block}]\n")
        self.gen = dataclasses.replace(gen, max_new_tokens=budget)

    @property
    def limit(self) -> int:
        """The most prompt tokens that leave room for a full answer."""
        return self.lm.model.cfg.block_size - self.gen.max_new_tokens

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def prompt_tokens(self, messages: list[dict]) -> int:
        from .generate import chat_prompt, encode_prompt

        tok = self.lm.tokenizer
        return len(encode_prompt(tok, chat_prompt(tok, messages)))

    def fit_context(self) -> int:
        """Drop the oldest turns until prompt + answer fit the context; returns how many were dropped."""
        dropped = 0
        while self.prompt_tokens(self.messages()) > self.limit and len(self.history) > 1:
            # Drop a whole exchange (user + assistant) at a time so roles keep alternating.
            n = 2 if len(self.history) >= 3 and self.history[1]["role"] == "assistant" else 1
            del self.history[:n]
            dropped += n
        return dropped

    def command(self, text: str) -> bool:
        """Handle a /command; False when ``text`` is not one."""
        name, _, arg = text.partition(" ")
        if name in ("/quit", "/exit"):
            raise EOFError
        if name == "/reset":
            self.history.clear()
            self.write("[history cleared]\n")
        elif name == "/system":
            self.system = arg.strip() or None
            self.write(f"[system message {'set' if self.system else 'removed'}]\n")
        elif name == "/help":
            self.write(HELP + "\n")
        elif name.startswith("/") and len(name) > 1 and name[1:].isalpha():
            self.write(f"[unknown command {name}; {HELP}]\n")
        else:
            return False
        return True

    def handle(self, line: str) -> Optional[str]:
        """Process one input line; returns the assistant's answer, or None for a command."""
        text = line.strip()
        if not text or self.command(text):
            return None
        user = {"role": "user", "content": text}
        alone = ([{"role": "system", "content": self.system}] if self.system else []) + [user]
        if self.prompt_tokens(alone) > self.limit:  # refuse before touching the history
            self.write(f"[message too long for the context window ({self.limit} tokens with the system message); "
                       f"shorten it]\n")
            return None
        self.history.append(user)
        dropped = self.fit_context()
        if dropped:
            self.write(f"[context window full: dropped the {dropped} oldest message(s)]\n")
        opts = {k: getattr(self.gen, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                   "repetition_penalty", "stop", "seed")}
        pieces: list[str] = []

        def stream(piece: str) -> None:
            pieces.append(piece)
            self.write(piece)

        try:
            answer = self.lm.chat(self.messages(), stream=stream, **opts)
        except KeyboardInterrupt:
            answer = "".join(pieces)
            self.write(" [stopped]")
        self.write("\n")
        self.history.append({"role": "assistant", "content": answer})
        return answer


def _stdout(s: str) -> None:
    sys.stdout.write(s)
    sys.stdout.flush()


def run_chat(lm, gen: GenerateConfig, system: Optional[str] = None, read: Callable[[str], str] = input,
             write: Optional[Callable[[str], None]] = None) -> None:
    write = write or _stdout
    if lm.tokenizer is None:
        raise UserError("this model has no tokenizer; chat needs a checkpoint with tokenizer.json")
    session = ChatSession(lm, gen, system, write=write)
    write(f"chatting with {lm.name} (context {lm.model.cfg.block_size} tokens). /reset, /system TEXT, /help, "
          f"/quit\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        try:
            text = line.strip()
            if text and not text.startswith("/"):
                write("model> ")
            session.handle(line)
        except EOFError:
            return
