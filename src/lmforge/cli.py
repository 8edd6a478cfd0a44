"""The `lmforge` command line: one subcommand per workflow.

Each subcommand parses a typed dataclass config with tyro (so `--help` documents every flag from the
field docstrings, and `--config FILE.yaml` plus dotted overrides such as `--train.lr 3e-4` map onto
the same dataclasses) and calls the recipe function that the Python API calls too.

A user's mistake (UserError / ConfigError) ends with one line on stderr and exit status 2; bugs keep
their traceback.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional

import tyro

from .config import (ConfigError, GenerateConfig, PrepareConfig, PretrainConfig, TokenizerConfig, UserError,
                     from_dict, load_yaml, merge)

# --------------------------------------------------------------------------------------------------
# Argument dataclasses for commands that are not a config of their own


@dataclass
class GenerateArgs:
    """`lmforge generate MODEL`: continue a prompt with a trained model."""

    model: tyro.conf.Positional[str]
    """A checkpoint, run or Hugging Face model directory."""
    prompt: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """A prompt; repeat the flag for several (they are decoded as one batch)."""
    gen: Annotated[GenerateConfig, tyro.conf.arg(name="")] = field(default_factory=GenerateConfig)
    chat: bool = False
    """Wrap each prompt as a user message with the model's chat template."""
    system: Optional[str] = None
    """System message for --chat."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or mps."""
    quantize: Literal["none", "int8"] = "none"
    """Weight-only int8 quantization of the linear layers for faster CPU decoding (lmforge.quantize)."""
    stream: bool = True
    """Print tokens as they are generated (single prompt only)."""


@dataclass
class ChatArgs:
    """`lmforge chat MODEL`: talk with a model in the terminal (/reset, /system TEXT, /quit)."""

    model: tyro.conf.Positional[str]
    """A checkpoint, run or Hugging Face model directory."""
    gen: Annotated[GenerateConfig, tyro.conf.arg(name="")] = field(
        default_factory=lambda: GenerateConfig(max_new_tokens=256, temperature=0.7, top_p=0.9))
    system: Optional[str] = None
    """System message."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or mps."""
    quantize: Literal["none", "int8"] = "none"
    """Weight-only int8 quantization of the linear layers for faster CPU decoding (lmforge.quantize)."""


@dataclass
class ImportArgs:
    """`lmforge import hf|gguf SRC --out CKPT`: convert a Hugging Face directory or a GGUF file."""

    src: tyro.conf.Positional[str]
    """A Hugging Face model directory, or a .gguf file."""
    out: str = "ckpt"
    """Output checkpoint directory."""


@dataclass
class ExportArgs:
    """`lmforge export hf MODEL --out DIR`: write a directory that transformers loads."""

    model: tyro.conf.Positional[str]
    """A checkpoint or run directory."""
    out: str = "hf"
    """Output directory."""


@dataclass
class QuickstartArgs:
    """`lmforge quickstart`: train a small model on Shakespeare's works and write with it."""

    out: str = "runs/quickstart"
    """Run directory."""
    corpus: Optional[str] = None
    """Text file(s) to train on instead of the default corpus (Shakespeare's complete works)."""
    minutes: float = 2.5
    """Training time budget in minutes (the step count is sized to fit it)."""
    vocab_size: int = 2048
    """BPE vocabulary size."""
    seed: int = 1337
    """Seed for everything."""


# --------------------------------------------------------------------------------------------------
# Commands


def cmd_tokenizer(argv: list[str]) -> int:
    if not argv or argv[0] != "train":
        _usage_error("usage: lmforge tokenizer train --input PATH... --kind bpe|char --vocab-size N --out DIR")
    cfg = tyro.cli(TokenizerConfig, args=argv[1:], prog="lmforge tokenizer train").validate()
    from .tokenizer import Tokenizer

    tok = Tokenizer.train(cfg)
    out = tok.save(cfg.out)
    print(f"tokenizer ({cfg.kind}, {tok.vocab_size} tokens) written to {out or cfg.out}")
    return 0


def cmd_prepare(argv: list[str]) -> int:
    cfg = tyro.cli(PrepareConfig, args=argv, prog="lmforge prepare").validate()
    from .data.prepare import prepare

    meta = prepare(cfg)
    s = meta["splits"]
    print(f"prepared {cfg.out}: train {s['train']['tokens']:,} tokens, val {s['val']['tokens']:,} tokens "
          f"({meta['dtype']}, vocab {meta['vocab_size']})")
    return 0


def _pop_option(argv: list[str], name: str) -> tuple[Optional[str], list[str]]:
    """Remove `--name VALUE` or `--name=VALUE` from argv."""
    out, value, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == name:
            if i + 1 >= len(argv):
                raise ConfigError(f"{name.lstrip('-')}: needs a value")
            value = argv[i + 1]
            i += 2
            continue
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return value, out


def pretrain_config_from_args(argv: list[str]) -> PretrainConfig:
    """--config FILE.yaml, then --preset NAME, then dotted overrides; with --resume and neither a config
    nor a preset, the run's own run.yaml is the starting point."""
    from .models.presets import get_preset

    config_file, argv = _pop_option(argv, "--config")
    preset, argv = _pop_option(argv, "--preset")
    out, _ = _pop_option(list(argv), "--out")
    data = load_yaml(config_file) if config_file else {}
    base = PretrainConfig()
    if "--resume" in argv and not config_file and not preset and out and (Path(out) / "run.yaml").is_file():
        base = from_dict(PretrainConfig, load_yaml(Path(out) / "run.yaml"))
    preset = preset or data.get("preset")
    if preset:
        base = dataclasses.replace(base, preset=preset, model=get_preset(preset))
    if data:
        base = merge(base, {k: v for k, v in data.items() if k != "preset"})
    return tyro.cli(PretrainConfig, default=base, args=argv, prog="lmforge pretrain")


def launch_torchrun(nproc: str, command: str, argv: list[str]) -> int:
    """`--nproc N`: re-run this command under torchrun with N processes on this machine."""
    import subprocess

    try:
        n = int(nproc)
    except ValueError:
        raise ConfigError(f"nproc: expected a whole number, got {nproc!r}") from None
    if n < 1:
        raise ConfigError(f"nproc: must be >= 1, got {n}")
    if "WORLD_SIZE" in os.environ:
        raise ConfigError("nproc: already running under torchrun; drop --nproc (torchrun sets the world size)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "lmforge", command, *argv]
    return subprocess.call(cmd)


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_pretrain(argv: list[str]) -> int:
    nproc, argv = _pop_option(argv, "--nproc")
    if nproc is not None and nproc != "1":
        return launch_torchrun(nproc, "pretrain", argv)
    cfg = pretrain_config_from_args(argv).validate()
    from .train.pretrain import pretrain

    try:
        final = pretrain(cfg)
    finally:
        _end_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {final}")
    return 0


@dataclass
class ConsolidateArgs:
    """`lmforge consolidate CKPT --out DIR`: turn a sharded (FSDP) checkpoint into a single checkpoint."""

    model: tyro.conf.Positional[str]
    """A sharded step checkpoint (RUN/checkpoints/step-N), or any checkpoint or run directory."""
    out: str = "ckpt"
    """Output checkpoint directory."""


def cmd_consolidate(argv: list[str]) -> int:
    args = tyro.cli(ConsolidateArgs, args=argv, prog="lmforge consolidate")
    from .checkpoint import load_checkpoint, save_checkpoint

    model, tokenizer, meta = load_checkpoint(args.model)
    out = save_checkpoint(args.out, model, tokenizer=tokenizer,
                          extra={k: v for k, v in meta.items() if k not in ("format", "version", "model", "path",
                                                                            "generation", "source")})
    print(f"single-file checkpoint written to {out}")
    return 0


def cmd_generate(argv: list[str]) -> int:
    args = tyro.cli(GenerateArgs, args=argv, prog="lmforge generate")
    args.gen.validate()
    from .lm import LM

    lm = LM.load(args.model, device=args.device, quantize=args.quantize)
    prompts = args.prompt or [""]
    stream = args.stream and len(prompts) == 1
    opts = dataclasses.asdict(args.gen)
    if args.chat:
        messages = lambda p: ([{"role": "system", "content": args.system}] if args.system else []) + [  # noqa: E731
            {"role": "user", "content": p}]
        if stream:
            lm.chat(messages(prompts[0]), stream=_print_stream, **opts)
            print()
        else:
            for p in prompts:
                print(lm.chat(messages(p), **opts))
        return 0
    if stream:
        sys.stdout.write(prompts[0])
        lm.generate(prompts[0], stream=_print_stream, **opts)
        print()
        return 0
    outs = lm.generate(prompts, **opts)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        if len(prompts) > 1:
            print(f"--- sample {i + 1}")
        print(p + o)
    return 0


def cmd_chat(argv: list[str]) -> int:
    args = tyro.cli(ChatArgs, args=argv, prog="lmforge chat")
    args.gen.validate()
    from .chat import run_chat
    from .lm import LM

    run_chat(LM.load(args.model, device=args.device, quantize=args.quantize), args.gen, system=args.system)
    return 0


def _print_stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def cmd_import(argv: list[str]) -> int:
    if not argv or argv[0] not in ("hf", "gguf"):
        _usage_error("usage: lmforge import hf|gguf SRC --out CKPT")
    kind = argv[0]
    args = tyro.cli(ImportArgs, args=argv[1:], prog=f"lmforge import {kind}")
    if kind == "hf":
        from .interop.hf import import_hf
        from .interop.hf_bert import import_hf_encdec

        out = import_hf_encdec(args.src, args.out) or import_hf(args.src, args.out)  # BERT/Marian, else causal LMs
    else:
        from .interop.gguf import import_gguf

        out = import_gguf(args.src, args.out)
    print(f"checkpoint written to {out}")
    return 0


def cmd_export(argv: list[str]) -> int:
    if not argv or argv[0] != "hf":
        _usage_error("usage: lmforge export hf MODEL --out DIR")
    args = tyro.cli(ExportArgs, args=argv[1:], prog="lmforge export hf")
    from .interop.hf import export_hf_path
    from .interop.hf_bert import export_hf_encdec

    out = export_hf_encdec(args.model, args.out)  # encoders -> BERT, seq2seq -> Marian; None for decoders
    if out is not None:
        print(f"Hugging Face model written to {out} (load it with AutoModel / MarianMTModel.from_pretrained)")
        return 0
    out = export_hf_path(args.model, args.out)
    print(f"Hugging Face model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_quickstart(argv: list[str]) -> int:
    args = tyro.cli(QuickstartArgs, args=argv, prog="lmforge quickstart")
    from .quickstart import quickstart

    quickstart(args)
    return 0


@dataclass
class MergeArgs:
    """`lmforge merge ADAPTER --out CKPT`: fold a LoRA adapter into its base model's weights."""

    adapter: tyro.conf.Positional[str]
    """A LoRA adapter checkpoint or run (from `lmforge finetune ... --lora.rank R`)."""
    out: str = "merged"
    """Output checkpoint directory (a plain checkpoint: export it with `lmforge export hf`)."""


def finetune_config_from_args(task: str, argv: list[str]):
    """--config FILE.yaml, then dotted overrides; with --resume and no config file, the run's own
    run.yaml is the starting point (as for pretrain)."""
    from .config import FinetuneConfig

    config_file, argv = _pop_option(argv, "--config")
    out, _ = _pop_option(list(argv), "--out")
    base = FinetuneConfig(task=task)
    if "--resume" in argv and not config_file and out and (Path(out) / "run.yaml").is_file():
        base = from_dict(FinetuneConfig, load_yaml(Path(out) / "run.yaml"))
    if config_file:
        base = merge(base, load_yaml(config_file))
    cfg = tyro.cli(FinetuneConfig, default=base, args=argv, prog=f"lmforge finetune {task}")
    return dataclasses.replace(cfg, task=task)


def cmd_finetune(argv: list[str]) -> int:
    if argv and argv[0] == "seq2seq":  # encoder-decoder training has its own config (cli_seq2seq.py)
        from .cli_seq2seq import cmd_finetune_seq2seq

        return cmd_finetune_seq2seq(argv[1:])
    if not argv or argv[0] not in ("sft", "classify"):
        _usage_error("usage: lmforge finetune sft|classify|seq2seq --model CKPT --data FILE --out RUN [--lora.rank R ...]")
    nproc, rest = _pop_option(argv[1:], "--nproc")
    if nproc is not None and nproc != "1":
        return launch_torchrun(nproc, "finetune", [argv[0], *rest])
    cfg = finetune_config_from_args(argv[0], rest).validate()
    if cfg.task == "sft":
        from .finetune.sft import finetune_sft as recipe
    else:
        from .finetune.classify import finetune_classify as recipe
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        final = recipe(cfg, log=print if main_rank else (lambda *_: None))
    finally:
        _end_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {final}")
    return 0


def cmd_merge(argv: list[str]) -> int:
    args = tyro.cli(MergeArgs, args=argv, prog="lmforge merge")
    from .finetune.lora import merge_adapter

    print(f"merged checkpoint written to {merge_adapter(args.adapter, args.out)}")
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    from .config import EvaluateConfig

    if argv and not argv[0].startswith("-"):  # `lmforge evaluate MODEL ...`
        argv = ["--model", argv[0], *argv[1:]]
    cfg = tyro.cli(EvaluateConfig, args=argv, prog="lmforge evaluate").validate()
    from .eval.run import evaluate

    evaluate(cfg)
    return 0


from .config import ServeConfig  # noqa: E402 - next to the serve command it belongs to


@dataclass
class ServeArgs:
    """`lmforge serve MODEL`: an OpenAI-compatible HTTP server with continuous batching, and a chat page at /."""

    model: tyro.conf.Positional[str]
    """A checkpoint, run or Hugging Face model directory."""
    serve: Annotated[ServeConfig, tyro.conf.arg(name="")] = field(default_factory=ServeConfig)


def cmd_serve(argv: list[str]) -> int:
    args = tyro.cli(ServeArgs, args=argv, prog="lmforge serve")
    args.serve.validate()
    from .serve.server import serve

    return serve(args.model, args.serve)


def cmd_presets(argv: list[str]) -> int:
    from .models.presets import PRESETS

    for name, p in PRESETS.items():
        print(f"{name:12s} {p.params / 1e6:9.2f}M  {p.about}")
    return 0


def _lazy(module: str, name: str) -> Callable[[list[str]], int]:
    """A command implemented in another lmforge module, imported only when it runs."""

    def run(argv: list[str]) -> int:
        import importlib

        return getattr(importlib.import_module(f"lmforge.{module}"), name)(argv)

    return run


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "quickstart": (cmd_quickstart, "train a small model on Shakespeare and write with it (the main job)"),
    "tokenizer": (cmd_tokenizer, "tokenizer train: learn a byte-level BPE or char tokenizer"),
    "prepare": (cmd_prepare, "turn text/jsonl/parquet into token shards"),
    "pretrain": (cmd_pretrain, "train a language model on prepared shards"),
    "generate": (cmd_generate, "generate text from a model"),
    "chat": (cmd_chat, "talk with a model in the terminal"),
    "import": (cmd_import, "import hf|gguf: convert a Hugging Face directory or GGUF file"),
    "export": (cmd_export, "export hf: write a directory transformers loads"),
    "consolidate": (cmd_consolidate, "turn a sharded (FSDP) checkpoint into a single checkpoint"),
    "presets": (cmd_presets, "list the named model configs"),
    "translate": (_lazy("cli_seq2seq", "cmd_translate"), "translate text with an encoder-decoder model (beam search)"),
    "summarize": (_lazy("cli_seq2seq", "cmd_summarize"), "summarize text with an encoder-decoder model"),
    "embed": (_lazy("cli_seq2seq", "cmd_embed"), "sentence embeddings (mean pooling) from an encoder (BERT)"),
    "finetune": (cmd_finetune, "finetune sft|classify: instruction tuning or classification, full or LoRA"),
    "merge": (cmd_merge, "fold a LoRA adapter into its base model's weights"),
    "evaluate": (cmd_evaluate, "perplexity / bits per byte, classification metrics, SQuAD EM and F1"),
    "serve": (cmd_serve, "OpenAI-compatible HTTP server (continuous batching) with a chat page"),
}


def _usage_error(msg: str) -> None:
    print(msg, file=sys.stderr)
    raise SystemExit(2)


def _help() -> str:
    lines = ["usage: lmforge COMMAND [options]   (lmforge COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:12s} {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"lmforge {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_help()}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[name][0](rest)
    except (UserError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
