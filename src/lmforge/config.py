"""Typed configuration for every lmforge workflow.

Dataclasses are the only configuration. The command line (through tyro), YAML files and the Python API
all build the same objects, and ``validate()`` rejects bad values before any work starts, naming the
field. This module must not import torch: it is imported by the CLI before anything heavy.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A user-facing configuration mistake. The CLI prints it as one line and exits non-zero."""


class UserError(RuntimeError):
    """Any user-facing mistake (missing file, bad data, wrong checkpoint): one line, no traceback."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


# --------------------------------------------------------------------------------------------------
# Model


@dataclass
class ModelConfig:
    """Architecture of a Transformer language model. One dataclass covers GPT-2, Llama, Mistral and
    Qwen2 style decoders (and the original Transformer's sinusoidal positions) through switches, plus
    the encoder-decoder Transformer (Vaswani et al. 2017; Marian) and BERT-style encoders (``arch``)."""

    arch: Literal["decoder", "seq2seq", "encoder"] = "decoder"
    """Model family: a decoder-only causal LM, an encoder-decoder (models/seq2seq.py) or an encoder-only
    BERT-style model (models/encoder.py)."""
    vocab_size: int = 256
    """Number of token ids (embedding rows)."""
    block_size: int = 256
    """Maximum sequence length (context window) in tokens."""
    n_layers: int = 4
    """Number of Transformer blocks."""
    n_heads: int = 4
    """Number of query heads."""
    n_kv_heads: Optional[int] = None
    """Number of key/value heads (grouped-query attention); None means n_heads (multi-head)."""
    d_model: int = 128
    """Width of the residual stream."""
    head_dim: Optional[int] = None
    """Per-head width; None means d_model // n_heads."""
    d_ff: Optional[int] = None
    """Hidden width of the MLP; None means 4*d_model (gelu/relu2) or the Llama rule for swiglu."""
    mlp: Literal["gelu", "gelu_tanh", "swiglu", "relu2", "relu", "silu"] = "gelu_tanh"
    """MLP type: GELU (exact or GPT-2's tanh approximation), SwiGLU (Llama), squared ReLU, ReLU (the
    original Transformer) or SiLU/swish (Marian)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalization layer."""
    norm_eps: float = 1e-5
    """Epsilon of the normalization layers."""
    pos: Literal["learned", "sinusoidal", "rope", "alibi", "none"] = "learned"
    """Positional encoding: learned absolute (GPT-2), sinusoidal (Vaswani et al. 2017), rotary (RoPE),
    ALiBi biases, or none."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    """RoPE frequency scaling for long context: none, linear (position interpolation) or Llama-3 style."""
    rope_factor: float = 1.0
    """RoPE scaling factor."""
    rope_low_freq_factor: float = 1.0
    """Llama-3 rope scaling: low-frequency factor."""
    rope_high_freq_factor: float = 4.0
    """Llama-3 rope scaling: high-frequency factor."""
    rope_original_max_positions: int = 8192
    """Llama-3 rope scaling: the context length the model was originally trained with."""
    bias: bool = True
    """Biases in the attention output and MLP linear layers (and norms for layernorm)."""
    qkv_bias: Optional[bool] = None
    """Biases in the q/k/v projections; None means the same as ``bias`` (Qwen2: True with bias False)."""
    qk_norm: bool = False
    """RMS-normalize queries and keys per head before attention (QK-norm)."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the output head."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (training only)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialization."""
    scale_embeddings: bool = False
    """Multiply token embeddings by sqrt(d_model), as the original Transformer does."""

    # Encoder-decoder (arch seq2seq) and encoder-only (arch encoder) models ------------------------
    n_encoder_layers: Optional[int] = None
    """seq2seq: encoder blocks; None means n_layers."""
    n_decoder_layers: Optional[int] = None
    """seq2seq: decoder blocks; None means n_layers."""
    norm_position: Literal["pre", "post"] = "pre"
    """seq2seq/encoder: "pre" computes x + f(norm(x)) with a final norm after the stack (Xiong et al. 2020);
    "post" computes norm(x + f(x)) as the original Transformer, Marian and BERT do. Decoders are pre-norm."""
    src_vocab_size: Optional[int] = None
    """seq2seq: rows of a separate source embedding (two vocabularies); None means source and target
    share one vocabulary and one embedding matrix of vocab_size rows."""
    type_vocab_size: int = 0
    """encoder: token types (BERT's segment A/B embeddings: 2); 0 means no token-type embedding."""
    embed_norm: bool = False
    """seq2seq/encoder: normalize the summed embeddings before the first block (BERT)."""
    sinusoidal_layout: Literal["interleave", "concat"] = "interleave"
    """Sinusoidal positions: sin and cos interleaved per frequency (the paper's formula), or all sines then
    all cosines (tensor2tensor, fairseq and Marian). Only the interleaved layout is used by decoders."""
    head_bias: bool = False
    """seq2seq/encoder: a bias on the output projection (Marian's final_logits_bias; BERT's MLM bias)."""
    pooler: bool = False
    """encoder: BERT's pooler tanh(W h_0 + b) over the first ([CLS]) position, which feeds the classifier."""
    n_labels: int = 0
    """encoder: classes of a sequence-classification head on the pooled output; 0 means no head."""
    mlm_head: bool = True
    """encoder: a masked-LM head (dense, activation, norm, then the output projection over the vocabulary)."""
    pad_id: Optional[int] = None
    """seq2seq/encoder: the padding token id; masks are built from it when a batch has padding."""
    decoder_start_id: Optional[int] = None
    """seq2seq: the token that starts every decoder input (lmforge tokenizers: BOS; Marian: pad)."""

    # Derived values -----------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def ff(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            # Llama: 2/3 of 4d, rounded up to a multiple of 64 (Touvron et al. 2023).
            hidden = int(2 * 4 * self.d_model / 3)
            return 64 * math.ceil(hidden / 64)
        return 4 * self.d_model

    @property
    def use_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def enc_layers(self) -> int:
        return self.n_encoder_layers if self.n_encoder_layers is not None else self.n_layers

    @property
    def dec_layers(self) -> int:
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    def validate(self, prefix: str = "model") -> "ModelConfig":
        p = prefix + "."
        _check(self.vocab_size >= 2, p + "vocab_size", f"must be >= 2, got {self.vocab_size}")
        _check(self.block_size >= 1, p + "block_size", f"must be >= 1, got {self.block_size}")
        _check(self.n_layers >= 1, p + "n_layers", f"must be >= 1, got {self.n_layers}")
        _check(self.n_heads >= 1, p + "n_heads", f"must be >= 1, got {self.n_heads}")
        _check(self.d_model >= 1, p + "d_model", f"must be >= 1, got {self.d_model}")
        if self.head_dim is None:
            _check(self.d_model % self.n_heads == 0, p + "n_heads",
                   f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        kv = self.kv_heads
        _check(kv >= 1 and self.n_heads % kv == 0, p + "n_kv_heads",
               f"n_heads={self.n_heads} must be a multiple of n_kv_heads={kv}")
        if self.pos == "rope":
            _check(self.hd % 2 == 0, p + "head_dim", f"RoPE needs an even head_dim, got {self.hd}")
        if self.pos == "sinusoidal":
            _check(self.d_model % 2 == 0, p + "d_model", "sinusoidal positions need an even d_model")
        _check(0.0 <= self.dropout < 1.0, p + "dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.norm_eps > 0, p + "norm_eps", "must be > 0")
        _check(self.rope_factor > 0, p + "rope_factor", "must be > 0")
        self._validate_arch(p)
        return self

    def _validate_arch(self, p: str) -> None:
        """Fields that belong to one family must keep their defaults in the others (nothing is silently
        ignored), and the encoder-decoder / encoder models support fewer positional schemes."""
        arch = self.arch
        _check(arch in ("decoder", "seq2seq", "encoder"), p + "arch",
               f"must be decoder, seq2seq or encoder, got {arch!r}")
        only = {"n_encoder_layers": ("seq2seq",), "n_decoder_layers": ("seq2seq",), "src_vocab_size": ("seq2seq",),
                "decoder_start_id": ("seq2seq",), "type_vocab_size": ("encoder",), "pooler": ("encoder",),
                "n_labels": ("encoder",), "norm_position": ("seq2seq", "encoder"),
                "embed_norm": ("seq2seq", "encoder"), "head_bias": ("seq2seq", "encoder")}
        for name, archs in only.items():
            default = next(f.default for f in fields(self) if f.name == name)
            _check(arch in archs or getattr(self, name) == default, p + name,
                   f"applies to arch {' or '.join(archs)} only (this model is arch {arch}); leave it at {default!r}")
        if arch == "decoder":
            _check(self.sinusoidal_layout == "interleave", p + "sinusoidal_layout",
                   "decoders use the interleaved layout; 'concat' applies to seq2seq and encoder models")
            return
        _check(self.pos in ("learned", "sinusoidal", "none"), p + "pos",
               f"arch {arch} supports learned, sinusoidal or none positions, got {self.pos!r}")
        _check(not self.qk_norm, p + "qk_norm", f"is not supported by arch {arch}")
        for name in ("n_encoder_layers", "n_decoder_layers"):
            v = getattr(self, name)
            _check(v is None or v >= 1, p + name, f"must be >= 1, got {v}")
        _check(self.src_vocab_size is None or self.src_vocab_size >= 2, p + "src_vocab_size",
               f"must be >= 2, got {self.src_vocab_size}")
        _check(self.type_vocab_size >= 0, p + "type_vocab_size", f"must be >= 0, got {self.type_vocab_size}")
        _check(self.n_labels >= 0, p + "n_labels", f"must be >= 0, got {self.n_labels}")
        if self.pad_id is not None:
            rows = min(self.vocab_size, self.src_vocab_size or self.vocab_size)
            _check(0 <= self.pad_id < rows, p + "pad_id", f"must be a token id in [0, {rows}), got {self.pad_id}")
        if self.decoder_start_id is not None:
            _check(0 <= self.decoder_start_id < self.vocab_size, p + "decoder_start_id",
                   f"must be a token id in [0, {self.vocab_size}), got {self.decoder_start_id}")

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count, computed from the config alone (matches the built module)."""
        d, hd, h, kv, ff, V = self.d_model, self.hd, self.n_heads, self.kv_heads, self.ff, self.vocab_size
        norm_p = d * (2 if (self.norm == "layernorm" and self.bias) else 1)
        qkv = d * (h + 2 * kv) * hd + ((h + 2 * kv) * hd if self.use_qkv_bias else 0)
        proj = h * hd * d + (d if self.bias else 0)
        attn = qkv + proj + (2 * hd if self.qk_norm else 0)
        if self.mlp == "swiglu":
            mlp = d * 2 * ff + ff * d + ((2 * ff + d) if self.bias else 0)
        else:
            mlp = d * ff + ff * d + ((ff + d) if self.bias else 0)
        block = 2 * norm_p + attn + mlp
        if self.arch != "decoder":
            return self._num_params_encdec(norm_p, attn, mlp, include_embeddings)
        total = self.n_layers * block + norm_p
        if include_embeddings:
            total += V * d
            if self.pos == "learned":
                total += self.block_size * d
            if not self.tie_embeddings:
                total += V * d
        return total

    def _num_params_encdec(self, norm_p: int, attn: int, mlp: int, include_embeddings: bool) -> int:
        """num_params of the seq2seq and encoder archs (module layouts: models/seq2seq.py, models/encoder.py).
        Cross-attention has as many weights as self-attention (q from the decoder, k and v from the memory)."""
        d, V = self.d_model, self.vocab_size
        pre = self.norm_position == "pre"
        enc_block = 2 * norm_p + attn + mlp
        head_b = V if self.head_bias else 0
        if self.arch == "encoder":
            total = self.n_layers * enc_block + (norm_p if pre else 0) + (norm_p if self.embed_norm else 0)
            total += (d * d + d) if self.pooler else 0
            total += (self.n_labels * d + self.n_labels) if self.n_labels else 0
            if self.mlm_head:
                total += d * d + (d if self.bias else 0) + norm_p + head_b
            embeddings = V * d + self.type_vocab_size * d + (self.block_size * d if self.pos == "learned" else 0)
            embeddings += V * d if (self.mlm_head and not self.tie_embeddings) else 0
        else:  # seq2seq
            dec_block = 3 * norm_p + 2 * attn + mlp
            total = self.enc_layers * enc_block + self.dec_layers * dec_block + (2 * norm_p if pre else 0)
            total += (2 * norm_p if self.embed_norm else 0) + head_b
            embeddings = V * d + (self.src_vocab_size or 0) * d
            embeddings += 2 * self.block_size * d if self.pos == "learned" else 0
            embeddings += 0 if self.tie_embeddings else V * d
        return total + (embeddings if include_embeddings else 0)


# --------------------------------------------------------------------------------------------------
# Tokenizer and data


@dataclass
class TokenizerConfig:
    """How to train a tokenizer."""

    input: list[str] = field(default_factory=list)
    """Text files, directories, .jsonl or .parquet files to learn the vocabulary from."""
    kind: Literal["bpe", "char"] = "bpe"
    """Byte-level BPE (GPT-2 style) or one token per character."""
    vocab_size: int = 8192
    """Target vocabulary size, special tokens included (BPE only)."""
    out: str = "tokenizer"
    """Output directory for tokenizer.json and tokenizer_config.json."""
    text_field: str = "text"
    """Field holding the text in .jsonl and .parquet inputs."""
    min_frequency: int = 2
    """BPE: minimum pair frequency for a merge."""
    errors: Literal["strict", "replace"] = "strict"
    """What to do with bytes that are not UTF-8: stop with the file and offset, or replace them."""

    def validate(self) -> "TokenizerConfig":
        _check(len(self.input) > 0, "input", "give at least one input path")
        if self.kind == "bpe":
            _check(self.vocab_size >= 256 + 8, "vocab_size",
                   f"byte-level BPE needs at least 264 (256 bytes + special tokens), got {self.vocab_size}")
        _check(self.min_frequency >= 1, "min_frequency", "must be >= 1")
        return self


@dataclass
class PrepareConfig:
    """How to turn a corpus into token shards."""

    input: list[str] = field(default_factory=list)
    """Text files, directories (searched for .txt/.md/.jsonl/.parquet), .jsonl or .parquet files."""
    tokenizer: str = ""
    """Tokenizer directory (or a checkpoint directory holding one)."""
    out: str = "data"
    """Output directory for the shards and meta.json."""
    val_fraction: float = 0.1
    """Fraction of the token stream (its tail) held out for validation."""
    text_field: str = "text"
    """Field holding the text in .jsonl and .parquet inputs."""
    shard_tokens: int = 50_000_000
    """Maximum tokens per shard file."""
    workers: int = 0
    """Tokenizer processes; 0 means the number of CPU cores."""
    errors: Literal["strict", "replace"] = "strict"
    """Undecodable bytes: stop naming the file and byte offset (strict) or replace them with U+FFFD."""

    def validate(self) -> "PrepareConfig":
        _check(len(self.input) > 0, "input", "give at least one input path")
        _check(bool(self.tokenizer), "tokenizer", "give the tokenizer directory (--tokenizer DIR)")
        _check(0.0 <= self.val_fraction < 1.0, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        _check(self.shard_tokens >= 1024, "shard_tokens", "must be >= 1024")
        _check(self.workers >= 0, "workers", "must be >= 0")
        return self


@dataclass
class DataConfig:
    """Which prepared data a training run reads."""

    path: str = ""
    """Prepared data directory (from `lmforge prepare`)."""
    num_workers: int = 0
    """Reserved for background loading; batches are cheap memory-mapped slices."""


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "muon"] = "adamw"
    """AdamW everywhere, or Muon (orthogonalized momentum) for hidden matrices with AdamW for the rest."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Final learning rate of the decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not to biases, norms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    muon_lr: float = 0.02
    """Muon learning rate for hidden matrices."""
    muon_momentum: float = 0.95
    """Muon momentum."""
    schedule: Literal["cosine", "wsd", "constant", "linear"] = "cosine"
    """Warmup then cosine decay, warmup-stable-decay, constant, or linear decay."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    decay_fraction: float = 0.2
    """WSD: fraction of the run spent in the final decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    fused: Optional[bool] = None
    """Use torch's fused AdamW (one kernel per tensor); None means on the CPU and CUDA. It gives the same
    update up to rounding as the unfused form (false). A resumed run keeps the form it was started with
    (the optimizer's saved settings), so its steps stay bit-identical."""

    def validate(self) -> "OptimConfig":
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.min_lr >= 0, "optim.min_lr", "must be >= 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1", "betas must be in [0, 1)")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(0 < self.decay_fraction <= 1, "optim.decay_fraction", "must be in (0, 1]")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        return self


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 2000
    """Number of optimizer steps."""
    batch_size: int = 12
    """Sequences per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    block_size: Optional[int] = None
    """Training sequence length; None means the model's block_size."""
    seed: int = 1337
    """Seed for initialization, data order and dropout."""
    eval_every: int = 250
    """Validation every N steps (and at the end); 0 disables."""
    eval_batches: int = 20
    """Validation micro-batches per evaluation."""
    save_every: int = 1000
    """Checkpoint every N steps (and at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """Keep the newest N step checkpoints; 0 keeps all."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps or auto."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision; auto means bf16 where the hardware supports it, else fp32."""
    compile: bool = False
    """Compile the model with torch.compile (opt-in)."""
    threads: int = 0
    """CPU threads for torch; 0 leaves torch's default."""
    progress: bool = True
    """Show a progress bar."""
    plot: bool = True
    """Redraw loss.png as training goes (needs matplotlib)."""
    stop_after: int = 0
    """Stop (with a checkpoint) after this many steps of the run, as if interrupted; 0 runs to the end."""
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """Data parallelism under torchrun: DDP, FSDP2 (fully_shard per block), or auto (DDP when launched
    with several processes)."""
    activation_checkpointing: bool = False
    """FSDP: recompute each block's activations in the backward pass to save memory."""
    cpu_offload: bool = False
    """FSDP: keep sharded parameters and optimizer state in CPU memory."""
    trace_samples: bool = False
    """Write the global sample indices each process consumes to RUN/samples-rankN.jsonl (data audit)."""
    dist_timeout_s: int = 600
    """Seconds a rank waits for the others before giving up (a dead rank ends the run, not hangs it)."""

    def validate(self) -> "TrainConfig":
        _check(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.block_size is None or self.block_size >= 1, "train.block_size", "must be >= 1")
        for name in ("eval_every", "eval_batches", "save_every", "keep_checkpoints", "log_every", "threads",
                     "stop_after"):
            _check(getattr(self, name) >= 0, f"train.{name}", "must be >= 0")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.dist_timeout_s >= 1, "train.dist_timeout_s", "must be >= 1")
        return self


@dataclass
class PretrainConfig:
    """`lmforge pretrain`: train a language model from scratch on prepared token shards."""

    data: str = ""
    """Prepared data directory (from `lmforge prepare`)."""
    out: str = "runs/run"
    """Run directory (run.yaml, metrics.jsonl, loss.png, checkpoints/, final/)."""
    preset: Optional[str] = None
    """Named model config to start from (see `lmforge presets`); model.* fields override it."""
    resume: bool = False
    """Continue the run in --out from its newest checkpoint."""
    init_from: Optional[str] = None
    """Start from the weights of this CKPT, RUN or Hugging Face directory instead of random ones."""
    vocab_from_data: bool = True
    """Set model.vocab_size to the data's vocabulary; when off, model.vocab_size must cover it."""
    objective: Literal["causal_lm", "mlm"] = "causal_lm"
    """causal_lm: next-token prediction (decoder models); mlm: masked-language modeling (BERT; needs
    model.arch encoder; see train/mlm.py)."""
    mlm_probability: float = 0.15
    """mlm: fraction of the tokens chosen for prediction (of those: 80% masked, 10% random, 10% kept)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "PretrainConfig":
        _check(bool(self.data), "data", "give the prepared data directory (--data DIR)")
        _check(bool(self.out), "out", "give the run directory (--out DIR)")
        _check((self.objective == "mlm") == (self.model.arch == "encoder"), "objective",
               f"objective {self.objective} does not fit model.arch {self.model.arch} (mlm trains encoders, "
               f"causal_lm trains decoders; try --preset bert-tiny with --objective mlm)")
        _check(0.0 < self.mlm_probability < 1.0, "mlm_probability", f"must be in (0, 1), got {self.mlm_probability}")
        self.model.validate()
        self.optim.validate()
        self.train.validate()
        bs = self.train.block_size
        if bs is not None:
            _check(bs <= self.model.block_size, "train.block_size",
                   f"{bs} is beyond the model's positions (model.block_size={self.model.block_size})")
        if self.train.stop_after:
            _check(self.train.stop_after < self.train.steps, "train.stop_after", "must be < train.steps")
        return self


@dataclass
class GenerateConfig:
    """Sampling settings for text generation."""

    max_new_tokens: int = 200
    """Maximum number of tokens to generate."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy decoding."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this total probability; 1 disables."""
    repetition_penalty: float = 1.0
    """Divide positive logits (multiply negative ones) of tokens already seen by this; 1 disables."""
    stop: list[str] = field(default_factory=list)
    """Stop when any of these strings appears in the generated text (it is not returned)."""
    seed: Optional[int] = None
    """Seed that makes sampling reproducible."""

    def validate(self) -> "GenerateConfig":
        _check(self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(self.top_k >= 0, "top_k", "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        return self


@dataclass
class ServeConfig:
    """`lmforge serve`: the OpenAI-compatible HTTP server (lmforge.serve)."""

    host: str = "127.0.0.1"
    """Interface to listen on; the default is reachable from this machine only (0.0.0.0 for all)."""
    port: int = 8000
    """TCP port; 0 picks a free one (the chosen address is printed)."""
    api_key: Optional[str] = None
    """Require `Authorization: Bearer KEY` on /v1/*; default: the LMFORGE_API_KEY environment variable, if set."""
    model_name: Optional[str] = None
    """Model id reported by /v1/models and accepted in requests; default: the checkpoint directory's name."""
    max_batch: int = 8
    """Decode slots: sequences generated together in one batched step (continuous batching)."""
    max_context: int = 2048
    """Context window served, in tokens (prompt + completion); capped at the model's block_size."""
    max_tokens_limit: int = 1024
    """Largest max_tokens a request may ask for."""
    default_max_tokens: int = 256
    """max_tokens of a request that sets none (capped by the room left in the context window)."""
    max_request_bytes: int = 1_000_000
    """Largest request body accepted; larger ones get 413."""
    max_queue: int = 256
    """Sequences that may wait for a free slot; more get 429."""
    timeout_s: float = 300.0
    """Per-request time limit (queueing included); a request past it is cancelled."""
    shutdown_timeout_s: float = 10.0
    """On shutdown (Ctrl-C, SIGTERM), seconds in-flight requests get to finish before they are cancelled."""
    batch_invariant: bool = True
    """Decode at a fixed shape (all slots, the whole context window) so a seeded request's text does not
    depend on what else is in the batch; off: cheaper steps when few slots are busy or contexts are long."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or mps."""
    dtype: Optional[str] = None
    """fp32, bf16 or fp16; default: the checkpoint's."""
    quantize: Literal["none", "int8"] = "none"
    """Weight-only int8 quantization of the linear layers for faster CPU decoding (lmforge.quantize)."""
    threads: int = 0
    """CPU threads for torch; 0 leaves torch's default."""
    access_log: bool = False
    """Log every HTTP request."""

    def validate(self) -> "ServeConfig":
        _check(bool(self.host), "host", "give an interface address, e.g. 127.0.0.1")
        _check(0 <= self.port <= 65535, "port", f"must be in [0, 65535], got {self.port}")
        _check(self.api_key is None or len(self.api_key) > 0, "api_key", "must not be empty")
        _check(1 <= self.max_batch <= 1024, "max_batch", f"must be in [1, 1024], got {self.max_batch}")
        _check(self.max_context >= 2, "max_context", f"must be >= 2, got {self.max_context}")
        _check(self.max_tokens_limit >= 1, "max_tokens_limit", "must be >= 1")
        _check(1 <= self.default_max_tokens <= self.max_tokens_limit, "default_max_tokens",
               f"must be in [1, max_tokens_limit={self.max_tokens_limit}], got {self.default_max_tokens}")
        _check(self.max_request_bytes >= 1024, "max_request_bytes", "must be >= 1024")
        _check(self.max_queue >= 1, "max_queue", "must be >= 1")
        _check(self.timeout_s > 0, "timeout_s", "must be > 0")
        _check(self.shutdown_timeout_s >= 0, "shutdown_timeout_s", "must be >= 0")
        _check(self.threads >= 0, "threads", "must be >= 0")
        return self


# --------------------------------------------------------------------------------------------------
# Fine-tuning and evaluation

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2", "lm_head")


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021): a frozen linear layer W gets a trainable update
    (alpha / rank) * B A, with A [rank, in] and B [out, rank]; B starts at zero so training starts at W."""

    rank: int = 0
    """Adapter rank; 0 means no adapters: full fine-tuning of every weight."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input (training only)."""
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    """Linear layers to adapt, by name: qkv and proj (attention), fc1 and fc2 (MLP), lm_head."""
    layers: int = 0
    """Adapt only the last N Transformer blocks; 0 means all. Gradients then stop at the first adapted
    block, which makes a training step much cheaper on a CPU."""

    def validate(self) -> "LoraConfig":
        _check(self.rank >= 0, "lora.rank", f"must be >= 0, got {self.rank}")
        _check(self.layers >= 0, "lora.layers", f"must be >= 0, got {self.layers}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        if self.rank:
            _check(len(self.targets) > 0, "lora.targets", "give at least one layer name")
            for t in self.targets:
                _check(t in LORA_TARGETS, "lora.targets", f"unknown layer {t!r} (known: {', '.join(LORA_TARGETS)})")
        return self


@dataclass
class FinetuneConfig:
    """`lmforge finetune sft|classify`: fine-tune a pretrained model on labeled data, fully or with LoRA."""

    model: str = ""
    """Base model: a checkpoint, run or Hugging Face model directory."""
    data: str = ""
    """Training data. sft: .jsonl in Alpaca form {"instruction", "input", "output"} or chat form
    {"messages": [{"role", "content"}, ...]}. classify: .jsonl {"text", "label"} or a folder with one
    subfolder of .txt files per label."""
    out: str = "runs/finetune"
    """Run directory (run.yaml, metrics.jsonl, checkpoints/, final/)."""
    task: Literal["sft", "classify"] = "sft"
    """The objective (set by the subcommand)."""
    resume: bool = False
    """Continue the run in --out from its newest checkpoint."""
    val_data: Optional[str] = None
    """Validation data in the same form; None holds out --val-fraction of --data."""
    val_fraction: float = 0.1
    """Fraction of the examples held out for validation when --val-data is not given."""
    max_len: Optional[int] = None
    """Tokens per sequence (a packed row, or one example); None means the model's block_size, at most 1024.
    Longer examples are truncated (sft: from the end; classify: the text is cut)."""
    pack: bool = True
    """sft: pack short examples into full rows (attention and positions stay inside each example)."""
    system: Optional[str] = None
    """sft: a system message put before every conversation that has none."""
    text_field: str = "text"
    """classify: the field holding the text in .jsonl data."""
    label_field: str = "label"
    """classify: the field holding the label in .jsonl data."""
    labels: list[str] = field(default_factory=list)
    """classify: the label names in order; empty means the sorted labels found in the training data."""
    class_weights: Literal["none", "balanced"] = "none"
    """classify: weight the loss per class; balanced weights each class by n / (k * count)."""
    suffix: str = ""
    """classify: text put after every (cut) text and always kept whole, such as a blank line then
    "Topic:" (in bash: $'\\n\\nTopic:'); the head reads its last token, where a pretrained model has summed
    up the text to continue it. Saved with the model and applied again by `lmforge evaluate`."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, min_lr=5e-5, warmup_steps=20,
                                                                   weight_decay=0.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=8, eval_every=100,
                                                                   eval_batches=10, save_every=100))

    def validate(self) -> "FinetuneConfig":
        _check(bool(self.model), "model", "give the base model (--model CKPT)")
        _check(bool(self.data), "data", "give the training data (--data FILE)")
        _check(bool(self.out), "out", "give the run directory (--out DIR)")
        _check(0.0 <= self.val_fraction < 1.0, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        _check(self.max_len is None or self.max_len >= 2, "max_len", "must be >= 2")
        _check(len(set(self.labels)) == len(self.labels), "labels", "names must be distinct")
        self.lora.validate()
        self.optim.validate()
        self.train.validate()
        if self.train.stop_after:
            _check(self.train.stop_after < self.train.steps, "train.stop_after", "must be < train.steps")
        return self


@dataclass
class EvaluateConfig:
    """`lmforge evaluate MODEL --task ... --data FILE`: score a model and print a table (and JSON)."""

    model: str = ""
    """A checkpoint, run, adapter or Hugging Face model directory."""
    task: Literal["perplexity", "classify", "squad", "bleu", "chrf", "rouge"] = "perplexity"
    """perplexity: perplexity and bits per byte of text; classify: accuracy, macro-F1 and confusion matrix
    of a classifier; squad: exact match and F1 of generated answers (SQuAD style); bleu / chrf / rouge:
    an encoder-decoder model's outputs for the sources of a .jsonl of {"source", "target"} pairs, scored
    with sacrebleu (BLEU, chrF) and rouge-score (ROUGE-1/2/L) against the targets."""
    data: str = ""
    """perplexity: .txt/.jsonl files or a folder; classify: .jsonl {"text", "label"} or a folder per label;
    squad: .jsonl {"question", "context"?, "answers": [...]} or a SQuAD v1.1 .json file."""
    out: Optional[str] = None
    """Also write the results as JSON to this file."""
    max_examples: int = 0
    """Score only the first N examples (documents for perplexity); 0 means all."""
    batch_size: int = 8
    """Examples per forward pass."""
    max_len: Optional[int] = None
    """Tokens per window (perplexity) or per text (classify); None means the model's block_size."""
    text_field: str = "text"
    """The field holding the text in .jsonl data."""
    label_field: str = "label"
    """classify: the field holding the label."""
    max_new_tokens: int = 32
    """squad: answer length limit in tokens."""
    prompt_format: Literal["chat", "plain"] = "chat"
    """squad: ask with the model's chat template, or as plain "Context/Question/Answer:" text."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or mps."""

    def validate(self) -> "EvaluateConfig":
        _check(bool(self.model), "model", "give the model (lmforge evaluate MODEL ...)")
        _check(bool(self.data), "data", "give the evaluation data (--data FILE)")
        _check(self.max_examples >= 0, "max_examples", "must be >= 0")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.max_len is None or self.max_len >= 2, "max_len", "must be >= 2")
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        return self


# --------------------------------------------------------------------------------------------------
# Encoder-decoder and encoder-only models: fine-tuning, generation, embeddings


@dataclass
class Seq2SeqGenerateConfig:
    """Decoding settings for encoder-decoder models: greedy, sampling or beam search."""

    max_new_tokens: int = 128
    """Maximum number of target tokens to generate."""
    num_beams: int = 1
    """Beam width; 1 decodes greedily (temperature 0) or samples (temperature > 0)."""
    length_penalty: float = 1.0
    """Beam search: hypotheses are ranked by log-probability / ((5 + length) / 6) ** length_penalty (GNMT,
    Wu et al. 2016); 0 ranks by raw log-probability, larger values favour longer outputs."""
    no_repeat_ngram_size: int = 0
    """Never generate an n-gram of this size twice in one output (all decoding modes); 0 disables."""
    temperature: float = 0.0
    """Sampling temperature (num_beams 1 only); 0 means greedy decoding."""
    top_k: int = 0
    """Sampling: keep only the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Sampling: nucleus probability; 1 disables."""
    repetition_penalty: float = 1.0
    """Greedy/sampling: CTRL's penalty on tokens already generated; 1 disables."""
    seed: Optional[int] = None
    """Seed that makes sampling reproducible."""

    def validate(self) -> "Seq2SeqGenerateConfig":
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _check(self.num_beams >= 1, "num_beams", f"must be >= 1, got {self.num_beams}")
        _check(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", "must be >= 0")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(self.num_beams == 1 or self.temperature == 0, "temperature",
               "beam search is deterministic; use temperature 0 with num_beams > 1")
        _check(self.top_k >= 0, "top_k", "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        return self


@dataclass
class Seq2SeqFinetuneConfig:
    """`lmforge finetune seq2seq`: train an encoder-decoder on source -> target pairs (translation,
    summarization) with teacher forcing and label-smoothed cross-entropy, from scratch or from a checkpoint."""

    data: str = ""
    """Training pairs: .jsonl with one {"source": ..., "target": ...} object per line."""
    out: str = "runs/seq2seq"
    """Run directory (run.yaml, metrics.jsonl, checkpoints/, final/)."""
    model: Optional[str] = None
    """Start from this seq2seq checkpoint, run or Hugging Face Marian directory; None trains from scratch
    with --preset and --arch.* (and a tokenizer trained on the pairs unless --tokenizer is given)."""
    preset: Optional[str] = "transformer-tiny"
    """From scratch: the named seq2seq config to start from; --arch.* fields override it."""
    resume: bool = False
    """Continue the run in --out from its newest checkpoint."""
    val_data: Optional[str] = None
    """Validation pairs in the same form; None holds out --val-fraction of --data (a seeded split)."""
    val_fraction: float = 0.05
    """Fraction of the pairs held out for validation when --val-data is not given."""
    source_field: str = "source"
    """The field holding the source text."""
    target_field: str = "target"
    """The field holding the target text."""
    tokenizer: Optional[str] = None
    """From scratch: an existing tokenizer directory for both sides; None trains one on the pairs."""
    shared_vocab: bool = True
    """From scratch: one vocabulary for source and target (tied embeddings); false trains two tokenizers
    (the source one is saved in CKPT/src_tokenizer/)."""
    tokenizer_kind: Literal["bpe", "char"] = "bpe"
    """Tokenizer trained from scratch: byte-level BPE or characters."""
    vocab_size: int = 8000
    """Tokenizer trained from scratch: vocabulary size per tokenizer (BPE)."""
    max_source_len: int = 128
    """Source tokens kept per example (longer sources are cut at the end)."""
    max_target_len: int = 128
    """Target tokens kept per example, EOS included (longer targets are cut)."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy (Szegedy et al. 2016; 0.1 in Vaswani et al. 2017)."""
    arch: ModelConfig = field(default_factory=lambda: ModelConfig(arch="seq2seq"))
    """The architecture when training from scratch (the preset's, with these overrides)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=200,
                                                                   weight_decay=0.01, beta2=0.98))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2000, batch_size=32, eval_every=250,
                                                                   eval_batches=10, save_every=500))

    def validate(self) -> "Seq2SeqFinetuneConfig":
        _check(bool(self.data), "data", "give the training pairs (--data FILE.jsonl)")
        _check(bool(self.out), "out", "give the run directory (--out DIR)")
        _check(0.0 <= self.val_fraction < 1.0, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        _check(self.max_source_len >= 1, "max_source_len", "must be >= 1")
        _check(self.max_target_len >= 2, "max_target_len", "must be >= 2 (one token and EOS)")
        _check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        _check(self.vocab_size >= 264 or self.tokenizer_kind == "char", "vocab_size",
               f"byte-level BPE needs at least 264, got {self.vocab_size}")
        _check(bool(self.source_field) and bool(self.target_field), "source_field", "field names must be non-empty")
        if self.model is None:
            _check(self.arch.arch == "seq2seq", "arch.arch", f"must be seq2seq, got {self.arch.arch!r}")
            self.arch.validate("arch")
        self.optim.validate()
        self.train.validate()
        if self.train.stop_after:
            _check(self.train.stop_after < self.train.steps, "train.stop_after", "must be < train.steps")
        return self


@dataclass
class Seq2SeqRunConfig:
    """`lmforge translate|summarize MODEL`: generate a target for each source text with a seq2seq model."""

    model: str = ""
    """A seq2seq checkpoint, run or Hugging Face Marian directory."""
    text: list[str] = field(default_factory=list)
    """Source texts given on the command line."""
    input: Optional[str] = None
    """A file of sources: .txt (one per line) or .jsonl (the --source-field of each object)."""
    source_field: str = "source"
    """.jsonl input: the field holding the source text."""
    out: Optional[str] = None
    """Write outputs here (.txt one per line, or .jsonl with source and output); None prints them."""
    batch_size: int = 16
    """Sources decoded together."""
    gen: Seq2SeqGenerateConfig = field(default_factory=lambda: Seq2SeqGenerateConfig(num_beams=4, length_penalty=0.6))
    device: str = "cpu"
    """cpu, cuda, cuda:N or mps."""

    def validate(self) -> "Seq2SeqRunConfig":
        _check(bool(self.model), "model", "give the model (lmforge translate MODEL ...)")
        _check(bool(self.text) != (self.input is not None), "input", "give source texts or --input FILE (one of them)")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.gen.validate()
        return self


@dataclass
class EmbedConfig:
    """`lmforge embed MODEL --input FILE`: sentence embeddings by mean pooling an encoder's last hidden
    states over the real tokens (sentence-transformers style)."""

    model: str = ""
    """An encoder checkpoint, run or Hugging Face BERT directory."""
    input: str = ""
    """Texts: .txt (one per line) or .jsonl (the --text-field of each object)."""
    out: str = "embeddings.npy"
    """Output: .npy (float32 [N, C]) or .jsonl ({"text", "embedding"} per line)."""
    text_field: str = "text"
    """.jsonl input: the field holding the text."""
    batch_size: int = 32
    """Texts per forward pass."""
    max_len: Optional[int] = None
    """Tokens per text, special tokens included (longer texts are cut); None means the model's block_size."""
    normalize: bool = False
    """Scale each embedding to unit length (as sentence-transformers' Normalize module does)."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or mps."""

    def validate(self) -> "EmbedConfig":
        _check(bool(self.model), "model", "give the model (lmforge embed MODEL --input FILE)")
        _check(bool(self.input), "input", "give the texts (--input FILE)")
        _check(self.out.endswith((".npy", ".jsonl")), "out", f"must end with .npy or .jsonl, got {self.out!r}")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.max_len is None or self.max_len >= 2, "max_len", "must be >= 2")
        return self


# --------------------------------------------------------------------------------------------------
# YAML / dict conversion


def to_dict(cfg: Any) -> Any:
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(x) for x in cfg]
    return cfg


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly nested, possibly partial) dict; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"{name}: unknown field (known: {', '.join(sorted(known))})")
        default = known[key].default_factory() if known[key].default_factory is not dataclasses.MISSING else None
        if is_dataclass(default):
            kwargs[key] = merge(default, value, where=name)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def merge(base: Any, overrides: dict, where: str = "") -> Any:
    """Return a copy of dataclass ``base`` with nested ``overrides`` applied."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where or type(base).__name__}: expected a mapping, got {type(overrides).__name__}")
    known = {f.name for f in fields(base)}
    changes = {}
    for key, value in overrides.items():
        name = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"{name}: unknown field (known: {', '.join(sorted(known))})")
        current = getattr(base, key)
        changes[key] = merge(current, value, where=name) if is_dataclass(current) else value
    return dataclasses.replace(base, **changes)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping at the top level")
    return data


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def write_run_yaml(cfg: Any, out: str | Path) -> None:
    """Create the run directory and record the run's config in it as run.yaml."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "run.yaml")
    except OSError as e:
        raise UserError(f"cannot write to run directory {out}: {e.strerror}") from None


def model_config_from_json(data: dict) -> ModelConfig:
    return from_dict(ModelConfig, data, where="model")


def model_config_to_json(cfg: ModelConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2)
