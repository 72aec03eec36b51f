"""The few collectives the trainer's bookkeeping needs (decisions, small objects, counters), each a
no-op in a single process. Tensor math of the model stays in the engines."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import UserError


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (small, picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def on_rank0(decide):
    """decide() on rank 0 only, its result (or its UserError) on every rank: ranks never disagree on
    what they read from a file system that may show them different states."""
    if world_size() == 1:
        return decide()
    box: list = [None]
    if rank() == 0:
        try:
            box[0] = ("ok", decide())
        except UserError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise UserError(value)
    return value
