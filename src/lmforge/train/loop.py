"""The one training loop. Pretraining and every fine-tuning objective run through ``train``.

A ``TrainTask`` supplies what differs between objectives: how to build a batch from global sample
indices and how to compute the loss. The loop owns everything else: device and precision, the
optimizer and schedule, gradient accumulation and clipping, validation, metrics, the progress bar,
checkpoints and exact resume.

Exact resume: the data order is a function of (seed, global sample index) only, the schedule is a
function of the step only, and a checkpoint stores weights, optimizer state, step, samples consumed
and every RNG state. A resumed run therefore computes bit-for-bit the same losses as one that never
stopped (on the same device and precision).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn

from ..checkpoint import save_checkpoint, step_checkpoints, unwrap
from ..config import OptimConfig, TrainConfig, UserError
from .metrics import MetricsLog, plot_metrics
from .distributed import DistInfo
from .optim import build_optimizer, clip_and_step
from .schedule import lr_at


@dataclass
class TrainTask:
    """The objective-specific half of training."""

    model: nn.Module
    get_batch: Callable[[list[int]], dict]
    """Global sample indices -> a dict of CPU tensors."""
    loss_fn: Callable[[nn.Module, dict], torch.Tensor]
    """(model, batch on device) -> scalar mean loss (the sum, when ``loss_terms`` is set)."""
    tokens_per_sample: int
    """For throughput: tokens processed per sample."""
    eval_batches: Optional[Callable[[], Iterable[dict]]] = None
    """A fixed set of validation batches, or None."""
    tokenizer: Any = None
    extra_config: dict = field(default_factory=dict)
    """Keys added to each checkpoint's config.json."""
    trainable: Optional[Callable[[nn.Module], dict]] = None
    """If set, the state dict to checkpoint (LoRA saves only its adapters)."""
    weights_file: str = "model.safetensors"
    """File name of the checkpointed weights (a LoRA adapter checkpoint uses adapter.safetensors)."""
    loss_terms: Optional[Callable[[dict], int]] = None
    """If set, ``loss_fn`` returns the loss summed over a batch's terms (SFT: its target tokens) and this
    counts them. A step then divides by the count over all its micro-batches and processes, so every term
    weighs the same wherever it falls (a mean of per-micro-batch means would give the tokens of a
    micro-batch with few targets more weight); validation likewise."""


# --------------------------------------------------------------------------------------------------
# Device and precision


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device: unknown device {name!r} (cpu, cuda, cuda:N, mps or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: CUDA was asked for but no GPU is available; use --train.device cpu")
    return dev


def pick_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32."""
    if name == "fp32":
        return None
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None  # on CPU bf16 autocast is usually slower than fp32
    if name == "fp16" and device.type != "cuda":
        raise UserError("train.dtype: fp16 needs a CUDA device (use bf16 or fp32)")
    return torch.bfloat16 if name == "bf16" else torch.float16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, task: TrainTask, device, dtype, info: Optional[DistInfo] = None) -> Optional[float]:
    """Mean validation loss. Every rank evaluates the same fixed batches (FSDP needs all ranks in
    every forward), so the result does not depend on the number of processes."""
    if task.eval_batches is None:
        return None
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in task.eval_batches():
        with autocast(device, dtype):
            total += float(task.loss_fn(model, _to_device(batch, device)))
        n += task.loss_terms(batch) if task.loss_terms is not None else 1
    model.train(was_training)
    return total / n if n else None


def _prune(out: Path, keep: int) -> None:
    if keep <= 0:
        return
    for _step, path in step_checkpoints(out)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                disable=not enabled)


def train(task: TrainTask, tcfg: TrainConfig, ocfg: OptimConfig, out: Path, *, resume: Optional[tuple[Path, dict]] = None,
          dist_info: Optional[DistInfo] = None, log: Callable[[str], None] = print) -> Path:
    """Train ``task.model`` for ``tcfg.steps`` optimizer steps, writing the run into ``out``.

    ``resume`` is (checkpoint dir, its train_state) from ``load_resume_state``; the model must already
    hold that checkpoint's weights unless the checkpoint is sharded (FSDP), in which case they are
    loaded here. Returns the final checkpoint directory (or the last one written when stopped early)."""
    from . import distributed as D

    out = Path(out)
    info = dist_info or DistInfo()
    device = pick_device(D.device_for(info, tcfg) or tcfg.device)
    dtype = pick_dtype(tcfg.dtype, device)
    if task.trainable is not None and info.mode == "fsdp":
        raise UserError("train.parallel: fsdp cannot checkpoint a partial state (LoRA adapters, task heads); "
                        "use --train.parallel ddp")
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    if device.type == "cpu":
        from ..kernels import use_cpu_kernels
        from .memory import keep_freed_memory

        keep_freed_memory()
        use_cpu_kernels(task.model)  # GPT-2's GELU and causal attention through lmforge's kernels: same functions
    if dtype == torch.float16 and info.mode == "fsdp":
        raise UserError("train.dtype: fp16 with --train.parallel fsdp is not supported (its gradients need a "
                        "sharded loss scaler); use bf16")
    model = D.wrap_model(task.model.to(device), info, tcfg, device, dtype)
    plain = unwrap(task.model)
    model.train()
    optimizer = build_optimizer(model, ocfg, device.type)
    # fp16 gradients underflow without loss scaling: the loss is multiplied by a scale before the backward
    # and the gradients divided by it before clipping (steps with an inf or nan are skipped, the scale adapts).
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    step, samples = 0, 0
    if resume is not None:
        ckpt, state = resume
        if (ckpt / "dcp").is_dir():
            D.load_sharded(ckpt / "dcp", model, optimizer)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=info.mode == "fsdp"))
        step, samples = int(state["step"]), int(state["samples"])
        if scaler is not None and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        rngs = state.get("rng_per_rank")
        if rngs and len(rngs) == info.world_size:
            set_rng_state(rngs[info.rank])
        elif info.world_size == 1 and "rng" in state:
            set_rng_state(state["rng"])
        else:  # another world size: per-rank dropout streams cannot carry over; derive fresh ones
            torch.manual_seed(tcfg.seed * 7919 + step * 31 + info.rank)

    fwd_model = model
    if tcfg.compile:
        fwd_model = _maybe_compile(model, device, log)

    per_step = tcfg.batch_size * tcfg.grad_accum * info.world_size
    main = info.is_main
    metrics = MetricsLog(out / "metrics.jsonl", enabled=main)
    if main:
        metrics.truncate_after(step)
    trace = MetricsLog(out / f"samples-rank{info.rank}.jsonl", enabled=tcfg.trace_samples)
    trace.truncate_after(step)
    bar = _progress(tcfg.steps, step, tcfg.progress and main)
    last_ckpt: Optional[Path] = None
    rng_at_step_start: Optional[dict] = None

    def save(at_step: int, final: bool = False) -> Path:
        """Every rank calls this; only rank 0 writes files (FSDP shards are written by all ranks)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # Interrupted inside a step, the RNG has moved on; store the state the next step must start from.
        rng = rng_at_step_start if rng_at_step_start is not None else rng_state()
        rngs = D.gather_objects(rng, info)
        state = {"step": at_step, "samples": samples, "rng": rng, "rng_per_rank": rngs,
                 "world_size": info.world_size, "samples_per_step": per_step, "parallel": info.mode}
        if scaler is not None:
            state["grad_scaler"] = scaler.state_dict()
        extra = dict(task.extra_config, step=at_step)
        path = out / "checkpoints" / f"step-{at_step:06d}"
        if info.mode == "fsdp":
            full = D.full_model_state(model, info)
            tmp_dcp = out / "checkpoints" / f".step-{at_step:06d}.dcp-tmp"
            D.save_sharded(tmp_dcp, model, optimizer)
            D.barrier(info)
            if main:
                def add_shards(tmp: Path) -> None:
                    os.replace(tmp_dcp, tmp / "dcp")
                save_checkpoint(path, plain, tokenizer=task.tokenizer, train_state=state, extra=extra,
                                state_dict=None, with_weights=False, before_commit=add_shards)
                if final:
                    save_checkpoint(out / "final", plain, tokenizer=task.tokenizer, extra=extra, state_dict=full)
        else:
            _, optim_sd = get_state_dict(model, optimizer)
            state["optimizer"] = optim_sd
            if main:
                weights = dict(state_dict=task.trainable(plain) if task.trainable is not None else None,
                               weights_file=task.weights_file)
                save_checkpoint(path, plain, tokenizer=task.tokenizer, train_state=state, extra=extra, **weights)
                if final:
                    save_checkpoint(out / "final", plain, tokenizer=task.tokenizer, extra=extra, **weights)
        if main:
            _prune(out, tcfg.keep_checkpoints)
        D.barrier(info)
        return out / "final" if final else path

    window_t0, window_tokens = time.perf_counter(), 0
    t_start = time.perf_counter()
    try:
        while step < tcfg.steps:
            lr = lr_at(step, tcfg.steps, ocfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("base_lr", ocfg.lr) / ocfg.lr
            rng_at_step_start = rng_state()
            micro_losses = []  # read back once per step: no host synchronization per micro-batch

            def micro_batch(micro: int) -> dict:
                first = samples + (micro * info.world_size + info.rank) * tcfg.batch_size
                indices = list(range(first, first + tcfg.batch_size))
                trace.write(step=step + 1, micro=micro, indices=indices)
                return task.get_batch(indices)

            if task.loss_terms is None:  # mean losses: average over the micro-batches
                batches = (micro_batch(m) for m in range(tcfg.grad_accum))
                divisor = tcfg.grad_accum
            else:  # summed losses: count the step's terms first; DDP then averages over the processes
                batches = [micro_batch(m) for m in range(tcfg.grad_accum)]
                terms = D.sum_across(float(sum(task.loss_terms(b) for b in batches)), info, device)
                if terms == 0:
                    raise UserError(f"step {step + 1} has no target tokens in any of its examples; check the "
                                    f"data (every example needs an answer that survives --max-len)")
                divisor = terms / info.world_size
            for micro, cpu_batch in enumerate(batches):
                batch = _to_device(cpu_batch, device)
                with D.no_sync(model, info, last_micro=micro == tcfg.grad_accum - 1):
                    with autocast(device, dtype):
                        loss = task.loss_fn(fwd_model, batch)
                    scaled = loss / divisor
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                micro_losses.append(loss.detach().float())
            grad_norm = clip_and_step(optimizer, model.parameters(), ocfg.grad_clip, scaler)
            optimizer.zero_grad(set_to_none=True)
            step, samples = step + 1, samples + per_step
            rng_at_step_start = None
            loss_sum = sum(torch.stack(micro_losses).cpu().tolist())
            if task.loss_terms is None:
                train_loss = D.mean_across(loss_sum / tcfg.grad_accum, info, device)
            else:
                train_loss = D.sum_across(loss_sum, info, device) / terms
            if not math.isfinite(train_loss):
                raise UserError(f"training diverged: loss is {train_loss} at step {step}; lower --optim.lr or "
                                f"raise --optim.warmup_steps")
            window_tokens += per_step * task.tokens_per_sample
            if bar is not None:
                bar.update(1)

            if step % tcfg.log_every == 0 or step == tcfg.steps:
                now = time.perf_counter()
                tps = window_tokens / max(now - window_t0, 1e-9)
                window_t0, window_tokens = now, 0
                skipped = {}
                if scaler is not None and grad_norm is not None and not math.isfinite(grad_norm):
                    skipped, grad_norm = {"skipped": True}, None  # fp16 overflow: the scaler skipped the step
                metrics.write(event="train", step=step, loss=train_loss, lr=lr, grad_norm=grad_norm,
                              tokens_per_s=round(tps, 1), samples=samples, elapsed_s=round(now - t_start, 3),
                              **skipped)
                if bar is not None:
                    bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)

            if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.steps):
                val = evaluate(fwd_model, task, device, dtype, info)
                if val is not None:
                    metrics.write(event="val", step=step, val_loss=val, val_ppl=math.exp(min(val, 50.0)))
                    msg = f"step {step}: val loss {val:.4f} (ppl {math.exp(min(val, 50.0)):.2f})"
                    if bar is not None:
                        bar.write(msg)
                    elif main:
                        log(msg)
                if tcfg.plot and main:
                    plot_metrics(out)

            stop_now = bool(tcfg.stop_after) and step == tcfg.stop_after
            if step == tcfg.steps or stop_now or (tcfg.save_every and step % tcfg.save_every == 0):
                last_ckpt = save(step, final=step == tcfg.steps)
            if stop_now:
                if main:
                    log(f"stopped after step {step} as asked; continue with --resume")
                break
    except KeyboardInterrupt:
        # A half-accumulated step is discarded; weights and optimizer are those of the last full step.
        optimizer.zero_grad(set_to_none=True)
        if bar is not None:
            bar.close()
        if step > 0 and info.world_size == 1:
            last_ckpt = save(step)
            log(f"interrupted: saved {last_ckpt}; continue with --resume")
        raise
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
        trace.close()
    if tcfg.plot and main:
        plot_metrics(out)
    return last_ckpt if last_ckpt is not None else out / "final"


def _maybe_compile(model: nn.Module, device: torch.device, log) -> nn.Module:
    if device.type not in ("cpu", "cuda"):
        log(f"note: torch.compile is not used on {device.type}")
        return model
    if sys.platform == "win32":
        log("note: torch.compile is not supported on Windows; running eagerly")
        return model
    try:
        # torch.compile is lazy: a missing or broken compiler (a C++ compiler for the CPU backend, Triton for
        # CUDA) shows only at the first call, which would be the first training step. A tiny function
        # compiled and run here finds that out before training starts.
        probe = torch.compile(lambda t: t * 2.0 + 1.0, dynamic=False)
        probe(torch.ones(8, device=device))
        return torch.compile(model)
    except Exception as e:  # an unsupported platform or missing compiler: run eagerly rather than fail
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        log(f"note: torch.compile unavailable ({e.__class__.__name__}: {reason}); running eagerly")
        return model


def load_resume_state(run: Path) -> Optional[tuple[Path, dict]]:
    """The newest step checkpoint of a run and its train_state, or None."""
    for _step, path in reversed(step_checkpoints(run, need_weights=False)):
        state_file = path / "train_state.pt"
        if state_file.is_file():
            try:
                return path, torch.load(state_file, map_location="cpu", weights_only=False)
            except Exception:  # a checkpoint is only renamed into place when complete; be defensive anyway
                continue
    return None
