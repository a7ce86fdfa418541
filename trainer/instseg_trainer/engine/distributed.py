"""One helper for torchrun/DDP; everything else is written as if single-process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from instseg_trainer.errors import InstsegError


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def gather_to_all(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over ranks (a collective: every rank must call it)."""
        if self.enabled:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device: str) -> torch.device:
    """ "auto" → CUDA when present, else CPU; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError as e:
        raise InstsegError(f"--device '{device}': {e}; use auto, cpu, cuda or cuda:N") from e
    if target.type == "cuda" and not torch.cuda.is_available():
        raise InstsegError(f"--device {device}: no CUDA device is available here; use cpu")
    return target


def configure_device(device: torch.device, tune: bool = True) -> None:
    """Process-wide speed settings on `device`. `tune` (training) also lets cuDNN pick
    kernels per shape and matmuls outside autocast use TF32; inference in someone else's
    process (`TrainedModel`) leaves those alone."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals made CPU steps 3-7x slower
    elif device.type == "cuda" and tune:
        # inputs are padded to /32 and batched by aspect ratio, so the backbone sees few
        # shapes; the heads' RoI counts vary but are bounded, so each shape is tuned once
        torch.backends.cudnn.benchmark = True
        # TF32 for what runs outside bf16 autocast (float32 heads' outputs, losses)
        torch.backends.cuda.matmul.allow_tf32 = True


def setup_distributed(device: str = "auto") -> Distributed:
    """Reads torchrun's environment; initialises NCCL (CUDA) or gloo (CPU) when world > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, target)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA; none on CPU (measured 7x slower there without AMX)."""
    return torch.bfloat16 if device.type == "cuda" else None
