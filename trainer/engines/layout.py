"""The process layout: which process this is, on which device, and how the processes split the work.
Built once when a run starts (from `parallel.*` and the world size the launcher gives) and handed to
every part that needs it: the engines, the data loader, the loss, evaluation, checkpoints. None of
them reads launcher variables or asks torch.distributed for sizes of its own.

The world is data parallel x context parallel: `cp` consecutive ranks (one node's NVLink
neighbours) split each sequence, and the `world / cp` groups of them read different rows. Expert
parallelism is carved out of data parallelism: `ep` consecutive data-parallel ranks split each MoE
layer's experts. As a device mesh: (dp / ep, ep, cp), named ("dp_out", "ep", "cp").
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.distributed as dist

from ...errors import UserError

_MESHES: dict = {}  # (world, cp, ep, device type) -> DeviceMesh, built once per process


@dataclass
class ParallelSection:
    cp: int = 1  # context parallelism: each sequence is split over this many consecutive ranks (docs/distributed.md)
    cp_method: Literal["ulysses", "ring"] = "ulysses"  # all-to-all of heads (Jacobs et al. 2023) or a ring of K/V (Liu et al. 2023)
    ep: int = 1  # expert parallelism: each MoE layer's experts are split over this many data-parallel ranks

    def __post_init__(self):
        if self.cp < 1 or self.ep < 1:
            raise UserError(f"parallel.cp={self.cp} and parallel.ep={self.ep} must be at least 1 (1: not split)")


@dataclass(frozen=True)
class Layout:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    cp: int = 1  # ranks that split one sequence
    cp_method: str = "ulysses"
    ep: int = 1  # data-parallel ranks that split one MoE layer's experts

    def __post_init__(self):
        if self.world_size % self.cp:
            raise UserError(f"parallel.cp={self.cp} does not divide the {self.world_size} processes; launch a multiple "
                            f"of {self.cp} processes or change parallel.cp")
        if self.dp_size % self.ep:
            raise UserError(f"parallel.ep={self.ep} does not divide the {self.dp_size} data-parallel ranks "
                            f"({self.world_size} processes / parallel.cp={self.cp}); change parallel.ep or the process count")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each group of `cp` ranks reads its own rows of the global batch."""
        return self.world_size // self.cp

    @property
    def dp_rank(self) -> int:
        """This process's index among the data-parallel ranks (the rows it reads)."""
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        """This process's part of each sequence (0 .. cp - 1)."""
        return self.rank % self.cp

    @property
    def ep_rank(self) -> int:
        """This process's share of each MoE layer's experts (0 .. ep - 1)."""
        return self.dp_rank % self.ep

    def describe(self) -> str:
        parts = [f"{self.dp_size} data-parallel"] + [f"{self.cp} context-parallel ({self.cp_method})"] * (self.cp > 1)
        parts += [f"experts split over {self.ep} of the data-parallel ranks"] * (self.ep > 1)
        return f"{self.world_size} process{'es' * (self.world_size > 1)} on {self.device.type}: " + " x ".join(parts[:2]) + \
            "".join(f"; {p}" for p in parts[2:])

    def mesh(self):
        """The (dp_out, ep, cp) DeviceMesh of the whole world; one per process and layout."""
        from torch.distributed.device_mesh import init_device_mesh

        key = (self.world_size, self.cp, self.ep, self.device.type)
        if key not in _MESHES:
            _MESHES[key] = init_device_mesh(self.device.type, (self.dp_size // self.ep, self.ep, self.cp),
                                            mesh_dim_names=("dp_out", "ep", "cp"))
        return _MESHES[key]

    def group(self, dim: Literal["cp", "ep"]):
        """The process group of this rank along `dim`."""
        return self.mesh()[dim].get_group()


def resolve_device(device_pref: str) -> torch.device:
    """The device `train.device` means on this machine: CUDA when asked for or (auto) present, else the CPU."""
    return torch.device("cuda" if device_pref != "cpu" and torch.cuda.is_available() else "cpu")


def init_distributed(device_pref: str, parallel: ParallelSection | None = None) -> Layout:
    """Join the process group a launcher (torchrun/deepspeed/slurm) set up through env vars; the layout
    of `parallel` over the world it gives (checked before any work)."""
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but this machine has no usable CUDA device; use train.device=auto or cpu")
    parallel = parallel or ParallelSection()
    device = resolve_device(device_pref)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    layout = Layout(rank, world, local_rank, device, parallel.cp, parallel.cp_method, parallel.ep)  # checks first
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        layout = replace(layout, device=torch.device("cuda", local_rank))
    if world > 1 and not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group(process_group_backend(cuda), device_id=layout.device if cuda else None)
    return layout


def process_group_backend(cuda: bool) -> str:
    """NCCL for CUDA tensors and gloo for CPU ones: FSDP2's CPU offload and DeepSpeed's offloaded
    optimizer reduce host tensors (the gradient norm, the skip flag) over the same group."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"
