"""The Python API: one object holding a model and its tokenizer.

    from lmforge import LM
    lm = LM.load("runs/shakespeare")          # CKPT, RUN or Hugging Face dir
    print(lm.generate("ROMEO:", max_new_tokens=100, temperature=0.8))
    lm.save("ckpt/"); lm.export_hf("hf/")

The command line calls the same functions (generate.generate_text, checkpoint.save_checkpoint, ...).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch

from .config import GenerateConfig, ModelConfig, UserError
from .generate import GenerationResult, chat_prompt, encode_prompt, generate_text

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}

# generation_config.json keys that map onto GenerateConfig fields.
_GEN_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "seed")


def _as_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    if isinstance(dtype, str) and dtype.lower() == "auto":
        return None
    raise UserError(f"dtype: unknown dtype {dtype!r} (use fp32, bf16 or fp16)")


def prepare_for_inference(model, quantize: str = "none", pack: bool = True):
    """What LM.load does to a decoder before generating: int8 weights (``quantize="int8"``), or on the
    CPU in fp32 linear layers laid out for decoding (``pack``: lmforge.packed); returns the model, in eval
    mode."""
    model.eval()
    if quantize != "none":
        from .quantize import quantize_model

        quantize_model(model, quantize)
    elif pack:
        from .packed import pack_linears

        pack_linears(model)
    p = next(model.parameters(), None)
    if (pack or quantize != "none") and p is not None and p.device.type == "cpu":
        from .kernels import use_cpu_kernels

        use_cpu_kernels(model)  # GPT-2's GELU and causal attention (prefill) through lmforge's kernels
    return model


class LM:
    """A language model and its tokenizer, ready to generate, chat, score and save."""

    def __init__(self, model, tokenizer=None, meta: Optional[dict] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.meta = dict(meta or {})
        self.model.eval()

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Union[str, Path], device: str = "cpu", dtype=None, quantize: str = "none",
             pack: bool = True) -> "LM":
        """Load a CKPT dir, a RUN dir (its newest checkpoint) or a Hugging Face model dir.

        ``quantize="int8"``: weight-only int8 linear layers for faster CPU decoding (lmforge.quantize);
        such an LM is for inference only (it cannot be saved).
        ``pack``: on the CPU in fp32, run the linear layers of decoding steps through lmforge's compiled
        kernel on weights in huge pages (or, without a C compiler, oneDNN's packed form), and generation's
        steps through the compiled decoding step (lmforge.packed, lmforge.kernels, lmforge.fused): about
        2.5x faster than torch's default path for GPT-2 124M; the LM still saves, exports and pickles as
        usual (``pack=False`` turns it off)."""
        from .checkpoint import load_checkpoint

        if quantize not in ("none", "int8"):
            raise UserError(f"quantize: unknown kind {quantize!r} (none or int8)")
        if quantize != "none" and str(device) != "cpu":
            raise UserError(f"quantize: {quantize} is a CPU inference path; use --device cpu or --quantize none")
        model, tokenizer, meta = load_checkpoint(path, device=device, dtype=_as_dtype(dtype))
        arch = getattr(getattr(model, "cfg", None), "arch", "decoder")
        if arch != "decoder":
            use = "lmforge translate / lmforge summarize" if arch == "seq2seq" else "lmforge embed"
            raise UserError(f"{path} holds an {'encoder-decoder' if arch == 'seq2seq' else 'encoder-only'} model, "
                            f"which does not continue text; use {use}")
        prepare_for_inference(model, quantize, pack)
        if "generation" not in meta:
            gen = Path(meta.get("path", path)) / "generation_config.json"
            if gen.is_file():
                try:
                    meta["generation"] = json.loads(gen.read_text(encoding="utf-8"))
                except ValueError:
                    pass
        return cls(model, tokenizer, meta)

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def num_params(self) -> int:
        """Parameters of the model as trained (packed or int8 linear layers counted as the weights they hold)."""
        from .packed import PackedLinear
        from .quantize import QuantLinear

        n = self.model.num_params()
        tied = getattr(self.model.cfg, "tie_embeddings", False)
        for name, m in self.model.named_modules():
            if isinstance(m, (PackedLinear, QuantLinear)) and not (tied and name == "lm_head"):
                n += m.in_features * m.out_features
                if isinstance(m, QuantLinear) and m.bias is not None:
                    n += m.out_features  # a buffer there, a parameter in the trained model
        return n

    @property
    def name(self) -> str:
        """A short name for messages: the checkpoint directory's name."""
        path = self.meta.get("path")
        if not path:
            return type(self.model).__name__
        p = Path(path)
        if p.name.startswith("step-") and p.parent.name == "checkpoints":  # RUN/checkpoints/step-N
            return f"{p.parent.parent.name}/{p.name}"
        if p.name == "final":  # RUN/final
            return p.parent.name
        return p.name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        c = self.config
        return (f"LM({self.num_params / 1e6:.1f}M params, {c.n_layers} layers, d_model={c.d_model}, "
                f"pos={c.pos}, vocab={c.vocab_size}, block_size={c.block_size})")

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise UserError("this model has no tokenizer; load a checkpoint that includes tokenizer.json or "
                            "pass one to LM(model, tokenizer)")
        return self.tokenizer

    # ----------------------------------------------------------------------------------------------
    def _generate_config(self, overrides: dict) -> GenerateConfig:
        """Defaults < the checkpoint's generation_config.json < the arguments given."""
        base: dict[str, Any] = {}
        gen = self.meta.get("generation") or {}
        for k in _GEN_KEYS:
            if gen.get(k) is not None:
                base[k] = gen[k]
        if gen.get("do_sample") is False:  # Hugging Face's way of saying greedy
            base["temperature"] = 0.0
        base.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(base.get("stop"), str):
            base["stop"] = [base["stop"]]
        return GenerateConfig(**base).validate()

    def _extra_stop_ids(self) -> set[int]:
        """EOS ids of a Hugging Face generation_config.json (Llama 3 lists several)."""
        eos = (self.meta.get("generation") or {}).get("eos_token_id")
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, list) else [eos])}

    def generate(self, prompt: Union[str, list[str]], max_new_tokens: Optional[int] = None,
                 temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None, stop: Union[str, list[str], None] = None,
                 seed: Optional[int] = None, stream: Optional[Callable[[str], None]] = None, *,
                 overflow: str = "slide", details: bool = False, stop_ids: Optional[Iterable[int]] = None):
        """Continue ``prompt`` (a string, or a list of strings generated as one batch).

        Unset arguments take the checkpoint's generation_config.json values, else GenerateConfig's
        defaults. ``stream(text_piece)`` receives the text as it is generated (single prompt only).
        ``stop_ids`` adds token ids that end generation (the tokenizer's EOS and end-of-turn tokens, and a
        Hugging Face generation_config.json's eos_token_id, always do). ``overflow``: what happens at the
        context window, "slide" (default), "stop" or "error" (see lmforge.generate).
        Returns the generated text (a list for a list of prompts), or GenerationResult(s) with details=True.
        """
        tok = self._need_tokenizer()
        cfg = self._generate_config(dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                         top_p=top_p, repetition_penalty=repetition_penalty, stop=stop,
                                         seed=seed))
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not all(isinstance(p, str) for p in prompts):
            raise UserError("prompt must be a string or a list of strings")
        enders = set(getattr(tok, "stop_ids", ())) | self._extra_stop_ids() | set(stop_ids or ())
        results: list[GenerationResult] = generate_text(self.model, tok, prompts, cfg, stream=stream,
                                                        overflow=overflow, stop_ids=enders)
        out = results if details else [r.text for r in results]
        return out[0] if single else out

    def _end_of_turn_ids(self) -> set[int]:
        """The token the chat template puts after an assistant message (ChatML's <|im_end|>, Llama 3's
        <|eot_id|>, ...), found by rendering a one-message conversation: generation stops there."""
        tok = self.tokenizer
        marker = "\x00lmforge\x00"
        try:
            text = tok.apply_chat_template([{"role": "assistant", "content": marker}], add_generation_prompt=False)
        except Exception:
            return set()
        if marker not in text:
            return set()
        tail = text.split(marker, 1)[1]
        ids = tok.encode(tail, add_bos=False) if tail else []
        if ids and tok.decode(ids[:1], skip_special_tokens=True) == "":
            return {ids[0]}  # a special token
        return set()

    def chat(self, messages: list[dict], **sampling) -> str:
        """Answer a conversation [{"role": "user", "content": ...}, ...]; returns the assistant's reply.
        Accepts the sampling arguments of ``generate`` (and ``stream``)."""
        tok = self._need_tokenizer()
        prompt = chat_prompt(tok, messages)
        sampling["stop_ids"] = set(sampling.pop("stop_ids", None) or ()) | self._end_of_turn_ids()
        return self.generate(prompt, **sampling)

    # ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, text: str) -> torch.Tensor:
        """Next-token logits [T, V] (float32) at every position of the tokenized ``text``."""
        tok = self._need_tokenizer()
        ids = encode_prompt(tok, text)
        if len(ids) > self.config.block_size:
            raise UserError(f"text is {len(ids)} tokens, longer than the context window "
                            f"(block_size={self.config.block_size}); use perplexity() for long texts")
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(idx)[0].float()

    @torch.inference_mode()
    def perplexity(self, text: str) -> float:
        """exp(mean negative log-likelihood per token) of ``text`` (its first token is the context only).
        Texts longer than the window are scored in windows that overlap by half, so every token but the
        first window's has at least block_size/2 tokens of context."""
        tok = self._need_tokenizer()
        ids = encode_prompt(tok, text)
        block = self.config.block_size
        if len(ids) < 2:
            raise UserError("perplexity needs a text of at least 2 tokens")
        if block < 2:
            raise UserError("perplexity needs a model with block_size >= 2")
        context = block // 2
        nll, count = 0.0, 0
        begin, scored_to = 0, 1  # targets ids[1:] are scored; ids[:scored_to] are done
        while True:
            end = min(begin + block, len(ids))
            idx = torch.tensor([ids[begin:end]], dtype=torch.long, device=self.device)
            logp_TV = torch.log_softmax(self.model(idx)[0].float(), dim=-1)
            first = max(scored_to, begin + 1)  # first target of this window
            targets = torch.tensor(ids[first:end], dtype=torch.long, device=self.device)
            lp = logp_TV[first - 1 - begin: end - 1 - begin].gather(1, targets[:, None])
            nll -= lp.sum().item()
            count += len(targets)
            scored_to = end
            if end == len(ids):
                break
            begin = end - context
        return math.exp(nll / count)

    # ----------------------------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> Path:
        """Write a CKPT directory (weights, config, tokenizer, generation defaults)."""
        from .checkpoint import save_checkpoint
        from .quantize import is_quantized

        if is_quantized(self.model):
            raise UserError("a quantized model cannot be saved; save the fp32 model and quantize when loading")
        gen = self.meta.get("generation")
        return save_checkpoint(path, self.model, tokenizer=self.tokenizer, generation=gen or None)

    def export_hf(self, path: Union[str, Path]) -> Path:
        """Write a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads."""
        from .interop.hf import export_hf
        from .quantize import is_quantized

        if is_quantized(self.model):
            raise UserError("a quantized model cannot be exported; export the fp32 model")
        return export_hf(self.model, self._need_tokenizer(), path)
