"""The process layout: which process this is, on which device, and how the processes split the work.
Built once when a run starts and handed to every part that needs it (the engines, the data loader,
the loss, evaluation, checkpoints), so none of them reads launcher variables or asks torch.distributed
for a world size of its own.

Today every process is a data-parallel rank: the data-parallel degree is the world size. Context and
expert parallelism split that world further; their degrees and process groups join this dataclass, and
each user reads its own coordinates from it (the loader: dp_rank / dp_size).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...errors import UserError


@dataclass(frozen=True)
class Layout:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """This process's index among the data-parallel ranks (the rows it reads)."""
        return self.rank

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each reads its own rows of the global batch."""
        return self.world_size


def resolve_device(device_pref: str) -> torch.device:
    """The device `train.device` means on this machine: CUDA when asked for or (auto) present, else the CPU."""
    return torch.device("cuda" if device_pref != "cpu" and torch.cuda.is_available() else "cpu")


def init_distributed(device_pref: str) -> Layout:
    """Join the process group a launcher (torchrun/deepspeed/slurm) set up through env vars."""
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but this machine has no usable CUDA device; use train.device=auto or cpu")
    device = resolve_device(device_pref)
    if "LOCAL_SIZE" in os.environ:  # the deepspeed launcher's name for the local world size
        os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["LOCAL_SIZE"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if world > 1 and not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group(process_group_backend(cuda), device_id=device if cuda else None)
    return Layout(rank, world, local_rank, device)


def process_group_backend(cuda: bool) -> str:
    """NCCL for CUDA tensors and gloo for CPU ones: FSDP2's CPU offload and DeepSpeed's offloaded
    optimizer reduce host tensors (the gradient norm, the skip flag) over the same group."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"
