"""The checkpoint directory: the contract between every stage (see docs/design in DESIGN.md).

    CKPT/config.json             {"format": "lmforge", "version": 1, "model": {...ModelConfig...}}
    CKPT/model.safetensors       weights of the unwrapped module (a tied head is stored once)
    CKPT/tokenizer.json          + tokenizer_config.json
    CKPT/generation_config.json  default sampling settings (optional)
    CKPT/train_state.pt          optimizer, scheduler, step, RNG states, data cursor (training runs)

Writes are atomic: everything goes to a temporary sibling directory, is fsynced, then renamed into
place, so a crash leaves either the old checkpoint or the new one, never a mixture.

This module sits below the recipes (train, finetune, serve) and above models: generation, interop and
serving all load checkpoints without importing the training code.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional

from .fsutil import fsync_dir
from .config import ConfigError, ModelConfig, UserError, model_config_from_json, to_dict

FORMAT = "lmforge"
VERSION = 1
# A LoRA adapter checkpoint: config.json has "adapter" (its LoRA config) and "base" (the base model's path),
# and adapter.safetensors holds the adapter weights only (plus a classification head's cls_head.* weights).
ADAPTER_FILE = "adapter.safetensors"
# Weights of a task head saved next to the language model's (e.g. a classifier's cls_head.weight); they are
# not part of the language model, which load_checkpoint returns without them.
HEAD_PREFIXES = ("cls_head.",)


def unwrap(model):
    """The plain module inside DDP / FSDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            model = model.module
        else:
            return model


def _drop_tied(cfg, state: dict) -> dict:
    if getattr(cfg, "tie_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    return state


def clean_state_dict(model) -> dict:
    """State dict of the unwrapped module, without the tied head and wrapper prefixes."""
    module = unwrap(model)  # the unwrapped module's keys carry no "module."/"_orig_mod." prefixes
    sd = _drop_tied(getattr(module, "cfg", None), module.state_dict())
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def atomic_dir(final: Path, write) -> Path:
    """Run ``write(tmp_dir)`` then move tmp_dir to ``final`` atomically (replacing an old ``final``)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {final.parent}: {e.strerror}") from None
    if not os.access(final.parent, os.W_OK):
        raise UserError(f"output directory {final.parent} is not writable")
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(path: str | Path, model, *, tokenizer=None, generation: Optional[dict] = None,
                    train_state: Optional[dict] = None, extra: Optional[dict] = None,
                    state_dict: Optional[dict] = None, with_weights: bool = True, before_commit=None,
                    weights_file: str = "model.safetensors") -> Path:
    """Write a CKPT directory atomically. ``extra`` adds keys to config.json (e.g. a LoRA base).
    ``state_dict`` replaces the module's own weights (a gathered FSDP state, say); ``with_weights=False``
    writes no model.safetensors (a sharded checkpoint whose weights live in dcp/); ``before_commit(tmp)``
    may add files before the directory is renamed into place. ``weights_file`` names the weights file
    (a LoRA adapter checkpoint writes adapter.safetensors, see ``load_checkpoint``)."""
    from safetensors.torch import save_file
    import torch

    module = unwrap(model)
    cfg: ModelConfig = module.cfg
    state = None
    if with_weights:
        state = clean_state_dict(module) if state_dict is None else _drop_tied(cfg, state_dict)

    def write(tmp: Path) -> None:
        meta = {"format": FORMAT, "version": VERSION, "model": to_dict(cfg)}
        if extra:
            meta.update(extra)
        (tmp / "config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if state is not None:
            save_file({k: v.cpu().contiguous() for k, v in state.items()}, str(tmp / weights_file),
                      metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        if generation:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        if before_commit is not None:
            before_commit(tmp)

    return atomic_dir(Path(path), write)


# --------------------------------------------------------------------------------------------------
# Finding and reading checkpoints

_STEP_RE = re.compile(r"^step-(\d+)$")


def step_checkpoints(run: Path, need_weights: bool = True) -> list[tuple[int, Path]]:
    """Complete step checkpoints of a run, oldest first. ``need_weights=False`` also lists sharded ones."""
    d = Path(run) / "checkpoints"
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if not (m and (p / "config.json").is_file()):
            continue
        if (p / "model.safetensors").is_file() or (p / ADAPTER_FILE).is_file() or \
                (not need_weights and (p / "dcp").is_dir()):
            found.append((int(m.group(1)), p))
    return sorted(found)


def is_lmforge_ckpt(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("format") == FORMAT
    except (ValueError, OSError):
        return False


def is_hf_dir(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return False
    return "model_type" in data or "architectures" in data


def resolve(path: str | Path) -> tuple[str, Path]:
    """Classify a model path: ("lmforge", CKPT) for a checkpoint or a run (its newest checkpoint),
    ("hf", DIR) for a Hugging Face model directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model not found: {p} (give a checkpoint, run or Hugging Face model directory)")
    if p.is_file():
        raise UserError(f"{p} is a file; give a checkpoint, run or Hugging Face model directory")
    if is_lmforge_ckpt(p):
        return "lmforge", p
    if (p / "final").is_dir() and is_lmforge_ckpt(p / "final"):
        steps = step_checkpoints(p)
        final_step = _ckpt_step(p / "final")
        if steps and final_step is not None and steps[-1][0] > final_step:
            return "lmforge", steps[-1][1]
        return "lmforge", p / "final"
    steps = step_checkpoints(p)
    if steps:
        return "lmforge", steps[-1][1]
    if is_hf_dir(p):
        return "hf", p
    if (p / "run.yaml").is_file():
        raise UserError(f"run {p} has no checkpoint yet")
    raise UserError(f"{p} is not an lmforge checkpoint, run, or Hugging Face model directory (no config.json)")


def _ckpt_step(ckpt: Path) -> Optional[int]:
    try:
        return json.loads((ckpt / "config.json").read_text(encoding="utf-8")).get("step")
    except (ValueError, OSError):
        return None


def read_config(ckpt: Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig of an lmforge CKPT and the whole config.json."""
    try:
        meta = json.loads((Path(ckpt) / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UserError(f"checkpoint {ckpt}: unreadable config.json ({e})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {ckpt}: config.json is not an lmforge checkpoint config")
    if int(meta.get("version", 0)) > VERSION:
        raise UserError(f"checkpoint {ckpt}: format version {meta.get('version')} is newer than this lmforge "
                        f"supports ({VERSION}); upgrade lmforge")
    try:
        cfg = model_config_from_json(meta["model"]).validate()
    except (ConfigError, TypeError, KeyError) as e:
        raise UserError(f"checkpoint {ckpt}: invalid model config ({e})") from None
    return cfg, meta


def load_state_into(module, state: dict, where: str, assign: bool = False) -> None:
    """Load weights strictly, turning mismatches into one clear line naming ``where``. With
    ``assign=True`` the tensors become the parameters (no copy; for a meta-device module)."""
    expected = {k: v for k, v in module.state_dict().items()}
    if getattr(module.cfg, "tie_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if bad:
            k = bad[0]
            parts.append(f"shape of {k} is {tuple(state[k].shape)}, config expects {tuple(expected[k].shape)}")
        raise UserError(f"{where}: weights do not match its config ({'; '.join(parts)})")
    module.load_state_dict(state, strict=False, assign=assign)


def load_checkpoint(path: str | Path, device: str = "cpu", dtype=None):
    """Load (model, tokenizer_or_None, meta) from a CKPT, RUN or Hugging Face directory."""
    import torch
    from safetensors.torch import load_file

    kind, ckpt = resolve(path)
    if kind == "hf":
        from .interop.hf import load_hf  # converted on load
        from .interop.hf_bert import load_hf_encdec

        # BERT and Marian directories have their own converters; load_hf handles the causal LMs.
        loaded = load_hf_encdec(ckpt, device=device, dtype=dtype)
        model, tokenizer = loaded if loaded is not None else load_hf(ckpt, device=device, dtype=dtype)
        return model, tokenizer, {"source": "hf", "path": str(ckpt)}

    from .models import build_model

    cfg, meta = read_config(ckpt)
    if meta.get("adapter") is not None:
        # A LoRA adapter: the base model with the adapter folded into its weights (lmforge.finetune.lora).
        from .finetune.lora import load_adapter_checkpoint

        model, tokenizer = load_adapter_checkpoint(ckpt, meta, device=device, dtype=dtype)
        return model, tokenizer, dict(meta, path=str(ckpt))
    weights = ckpt / "model.safetensors"
    if not weights.is_file() and (ckpt / "dcp").is_dir():
        # A sharded (FSDP) checkpoint: consolidate its shards into one module on load.
        from .train.distributed import load_dcp_model_state

        model = build_model(cfg)
        load_dcp_model_state(ckpt / "dcp", model)
        model = model.to(device)
    elif not weights.is_file():
        raise UserError(f"checkpoint {ckpt}: model.safetensors is missing")
    else:
        with torch.device("meta"):
            model = build_model(cfg)
        model = model.to_empty(device=device)
        try:
            state = load_file(str(weights), device=str(device))
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise UserError(f"checkpoint {ckpt}: cannot read model.safetensors ({e})") from None
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}  # e.g. a classifier's head
        load_state_into(model, state, f"checkpoint {ckpt}")
        model.reinit_buffers()
        if cfg.tie_embeddings and getattr(model, "lm_head", None) is not None:  # an encoder may have no head
            model.lm_head.weight = model.tok_emb.weight
    if dtype is not None:
        model = model.to(dtype)
        model.reinit_buffers()  # RoPE frequencies stay fp32
    model.eval()
    tokenizer = None
    if (ckpt / "tokenizer.json").is_file():
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.load(ckpt)
    meta = dict(meta)
    meta["path"] = str(ckpt)
    gen = ckpt / "generation_config.json"
    if gen.is_file():
        try:
            meta["generation"] = json.loads(gen.read_text(encoding="utf-8"))
        except ValueError:
            pass
    return model, tokenizer, meta
