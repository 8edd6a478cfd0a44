"""torch.distributed setup: process groups from torchrun's environment, DDP and FSDP2 wrapping, and
sharded checkpoints through torch.distributed.checkpoint (DCP).

Parallelism wraps the model from outside; the model's forward stays single-device and plain.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import TrainConfig, UserError


@dataclass
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(tcfg: TrainConfig) -> DistInfo:
    """Join the process group that torchrun describes in the environment (gloo on CPU, NCCL on GPU)."""
    world = launched_world_size()
    mode = tcfg.parallel
    if world <= 1:
        if mode in ("ddp", "fsdp"):
            raise UserError(f"train.parallel={mode} needs several processes: launch with "
                            f"`torchrun --nproc-per-node N -m lmforge pretrain ...` or `lmforge pretrain --nproc N`")
        return DistInfo()
    if mode == "none":
        raise UserError("train.parallel=none but torchrun started several processes; use ddp or fsdp")
    mode = "ddp" if mode == "auto" else mode
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = tcfg.device
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if wants_cuda and not torch.cuda.is_available():
        raise UserError("NCCL (GPU) training was asked for but no GPU is available; use --train.device cpu (gloo)")
    backend = "nccl" if wants_cuda else "gloo"
    if wants_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                            f"lower --nproc-per-node")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=tcfg.dist_timeout_s))
    return DistInfo(world_size=world, rank=rank, local_rank=local_rank, mode=mode)


def device_for(info: DistInfo, tcfg: TrainConfig) -> Optional[str]:
    """Each rank's device: cuda:LOCAL_RANK under NCCL."""
    if info.world_size > 1 and dist.get_backend() == "nccl":
        return f"cuda:{info.local_rank}"
    return None


def wrap_model(model: nn.Module, info: DistInfo, tcfg: TrainConfig, device: torch.device,
               autocast_dtype: Optional[torch.dtype]) -> nn.Module:
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if info.mode == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if autocast_dtype is not None and device.type == "cuda":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)
        if tcfg.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise UserError("FSDP needs a model with a .blocks list")
        if tcfg.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            for i, block in enumerate(list(blocks)):
                blocks[i] = checkpoint_wrapper(block)
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    return model


def no_sync(model: nn.Module, info: DistInfo, last_micro: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if last_micro or info.world_size == 1:
        return contextlib.nullcontext()
    if info.mode == "ddp":
        return model.no_sync()
    if info.mode == "fsdp":
        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()


def sum_across(value: float, info: DistInfo, device: torch.device) -> float:
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def mean_across(value: float, info: DistInfo, device: torch.device) -> float:
    return sum_across(value, info, device) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def gather_objects(obj, info: DistInfo) -> list:
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------------
# Sharded (DCP) state


def save_sharded(path: Path, model: nn.Module, optimizer) -> None:
    """Every rank writes its shards of model and optimizer state into ``path`` (a DCP directory)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, optimizer) -> None:
    """Load DCP shards into a (possibly differently sharded, or unsharded) model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_model_state(model: nn.Module, info: DistInfo) -> Optional[dict]:
    """The unsharded model state on rank 0 (CPU), None elsewhere; every rank must call it."""
    if info.mode != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if info.is_main else None


def load_dcp_model_state(dcp_dir: Path, model: nn.Module) -> None:
    """Single process: read the model part of a DCP checkpoint into a plain module (consolidation)."""
    import torch.distributed.checkpoint as dcp

    sd = {k: v for k, v in model.state_dict().items()}
    tied = getattr(model.cfg, "tie_embeddings", False)
    if tied:
        sd.pop("lm_head.weight", None)
    state = {"model": sd}
    dcp.load(state, checkpoint_id=str(dcp_dir))
    model.load_state_dict(state["model"], strict=not tied)
