"""Subcommands for encoder-decoder and encoder-only models, registered in cli.py:

    lmforge finetune seq2seq --data pairs.jsonl --out RUN [--model CKPT | --preset transformer-tiny] [...]
    lmforge translate MODEL "text" ... | --input FILE [--out FILE] [--gen.num-beams 4 ...]
    lmforge summarize MODEL --input FILE [...]       (translate with summarization defaults)
    lmforge embed MODEL --input FILE --out FILE.npy|.jsonl [--normalize]

Each parses a typed config from config.py with tyro and calls the same function the Python API calls.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import tyro

from .config import (EmbedConfig, Seq2SeqFinetuneConfig, Seq2SeqGenerateConfig, Seq2SeqRunConfig, UserError,
                     from_dict, load_yaml, merge)


def seq2seq_config_from_args(argv: list[str]) -> Seq2SeqFinetuneConfig:
    """--config FILE.yaml, then --preset NAME (from scratch), then dotted overrides; with --resume and
    neither, the run's own run.yaml is the starting point."""
    from .cli import _pop_option
    from .models.presets import get_preset

    config_file, argv = _pop_option(argv, "--config")
    preset, argv = _pop_option(argv, "--preset")
    out, _ = _pop_option(list(argv), "--out")
    data = load_yaml(config_file) if config_file else {}
    base = Seq2SeqFinetuneConfig()
    from_run = "--resume" in argv and not config_file and not preset and out and (Path(out) / "run.yaml").is_file()
    if from_run:
        base = from_dict(Seq2SeqFinetuneConfig, load_yaml(Path(out) / "run.yaml"))
    else:
        preset = preset or data.get("preset") or base.preset
    if preset:
        pcfg = get_preset(preset)
        if pcfg.arch != "seq2seq":
            raise UserError(f"preset: {preset} is a {pcfg.arch} model; finetune seq2seq needs a seq2seq preset "
                            f"(transformer-tiny, transformer-base)")
        base = dataclasses.replace(base, preset=preset, arch=pcfg)
    if data:
        base = merge(base, {k: v for k, v in data.items() if k != "preset"})
    return tyro.cli(Seq2SeqFinetuneConfig, default=base, args=argv, prog="lmforge finetune seq2seq")


def cmd_finetune_seq2seq(argv: list[str]) -> int:
    from .cli import launch_torchrun, _pop_option

    nproc, argv = _pop_option(argv, "--nproc")
    if nproc is not None and nproc != "1":
        return launch_torchrun(nproc, "finetune", ["seq2seq", *argv])
    cfg = seq2seq_config_from_args(argv).validate()
    from .finetune.seq2seq import finetune_seq2seq

    try:
        final = finetune_seq2seq(cfg)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    print(f"checkpoint: {final}")
    return 0


# --------------------------------------------------------------------------------------------------


def read_sources(path: str, field: str = "source") -> list[str]:
    """Texts from .txt (one per line, blank lines kept as empty sources) or .jsonl (``field`` of each object)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"input file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text (byte offset {e.start})") from None
    if p.suffix != ".jsonl":
        lines = text.splitlines()
        if not lines:
            raise UserError(f"{p} is empty")
        return lines
    from .finetune.data import read_jsonl

    out = []
    for no, obj in read_jsonl(p):
        if not isinstance(obj.get(field), str):
            raise UserError(f"{p} line {no}: needs a string field {field!r}")
        out.append(obj[field])
    return out


def _run_seq2seq(argv: list[str], prog: str, default: Seq2SeqRunConfig) -> int:
    if argv and not argv[0].startswith("-"):  # `lmforge translate MODEL [TEXT ...]`
        model, rest = argv[0], argv[1:]
        texts = []
        while rest and not rest[0].startswith("--"):
            texts.append(rest.pop(0))
        argv = ["--model", model, *(["--text", *texts] if texts else []), *rest]
    cfg = tyro.cli(Seq2SeqRunConfig, default=default, args=argv, prog=prog).validate()
    from .seq2seq_generate import load_seq2seq, translate_texts

    texts = cfg.text or read_sources(cfg.input, cfg.source_field)
    model, src_tok, tgt_tok, _ = load_seq2seq(cfg.model, device=cfg.device)
    outs = translate_texts(model, src_tok, tgt_tok, texts, cfg.gen, batch_size=cfg.batch_size)
    if cfg.out is None:
        for o in outs:
            print(o)
        return 0
    from .fsutil import atomic_write_text

    if cfg.out.endswith(".jsonl"):
        body = "".join(json.dumps({"source": s, "output": o}, ensure_ascii=False) + "\n" for s, o in zip(texts, outs))
    else:
        body = "".join(o.replace("\n", " ") + "\n" for o in outs)
    atomic_write_text(Path(cfg.out), body)
    print(f"{len(outs)} outputs written to {cfg.out}", file=sys.stderr)
    return 0


def cmd_translate(argv: list[str]) -> int:
    return _run_seq2seq(argv, "lmforge translate", Seq2SeqRunConfig())


def cmd_summarize(argv: list[str]) -> int:
    # Summaries are longer than their per-token evidence suggests and tend to repeat: a stronger length
    # penalty and no repeated trigrams are the usual defaults (Paulus et al. 2018; BART's CNN/DM settings).
    gen = Seq2SeqGenerateConfig(num_beams=4, length_penalty=1.0, no_repeat_ngram_size=3, max_new_tokens=96)
    return _run_seq2seq(argv, "lmforge summarize", Seq2SeqRunConfig(gen=gen))


def cmd_embed(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-"):  # `lmforge embed MODEL --input FILE`
        argv = ["--model", argv[0], *argv[1:]]
    cfg = tyro.cli(EmbedConfig, args=argv, prog="lmforge embed").validate()
    from .embed import embed_file

    n, dim = embed_file(cfg)
    print(f"{n} embeddings of dimension {dim} written to {cfg.out}")
    return 0
