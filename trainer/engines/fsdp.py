"""The FSDP2 engine: `fully_shard` per block and on the root (parameters, gradients and optimizer
state sharded over ranks as DTensors), bf16 parameters with fp32 gradient reduction under
precision bf16, optional CPU offload, behind the loop's Engine interface.

Build order (as torchtitan's): activation checkpointing / compile per block -> shard the meta model
-> allocate only the local shards (`to_empty`) -> load the full initial weights from rank 0 with
`set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`, one tensor at a time.

Checkpoints are torch.distributed.checkpoint (DCP) folders, which reshard on load: a checkpoint
saved by N ranks loads at any world size.

On one rank (without CPU offload) there is nothing to shard, and the model runs unwrapped under
autocast, as LocalEngine runs it (torchtitan applies FSDP only when it shards too): FSDP2's per-block
all-gathers, reduce-scatters and DTensor dispatch would be host work with no effect, and on a small
model the host is what the GPU then waits for (SmolLM2-135M shape on one H200: FSDP2 machinery 0.68x
the local engine, `docs/benchmarks.md`). Checkpoints stay DCP folders with the same keys, so a
one-rank run resumes on N ranks and back.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from ...errors import UserError
from ..params import Target
from .base import (LossFn, build_optimizer, clip_and_step, cpu_snapshot, full_initial_state, optimizer_groups,
                   whole_targets, wrap_blocks)
from .experts import shard_experts
from .fp8 import after_fsdp_step, apply_fp8
from .layout import Layout, process_group_backend
from .local import build_whole
from .spec import EngineSpec, autocast_for

DCP_DIR = "dcp"  # the checkpoint's subfolder


@dataclass
class FSDPSection:
    reshard_after_forward: bool = True  # free each block's gathered weights after its forward (re-gathered in backward)
    cpu_offload: bool = False  # CPUOffloadPolicy: sharded weights, gradients and the optimizer step live on CPU
    defer_grad_sync: bool = False  # reduce-scatter only on a step's last micro-batch (less traffic, full-size grads kept)


def ensure_process_group(layout: Layout) -> None:
    """FSDP2 needs a process group even for one process (a resume at world size 1)."""
    if not dist.is_initialized():
        cuda = layout.device.type == "cuda"
        dist.init_process_group(process_group_backend(cuda), store=dist.HashStore(), rank=0, world_size=1,
                                device_id=layout.device if cuda else None)


class FSDPEngine:
    def __init__(self, model, spec: EngineSpec, initial_state: dict | None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                            register_fsdp_forward_method)

        layout, f = spec.layout, spec.fsdp
        ensure_process_group(layout)
        self.spec, self.layout = spec, layout
        self.sharded = dist.get_world_size() > 1 or f.cpu_offload
        # A background save runs DCP's collectives on a group of its own, so they never interleave with
        # the training step's (torch's advice for async_save); gloo, since it moves host tensors.
        self._save_group = dist.new_group(backend="gloo") if spec.async_checkpoint else None
        self._snapshot = None  # host buffers of the last async checkpoint, reused by the next
        if not self.sharded:
            print("fsdp2 on one rank: nothing to shard, the model runs unsharded (checkpoints stay DCP, "
                  "resumable on any number of ranks)", flush=True)
            self.optimizer = build_whole(model, spec, initial_state)
            self.model = self.module = model
            self.autocast = lambda: autocast_for(layout.device, spec.bf16)
            return
        self.autocast = contextlib.nullcontext  # FSDP2's mixed precision casts the gathered weights instead
        mesh = init_device_mesh(layout.device.type, (dist.get_world_size(),))
        # Mixed precision as in torchtitan: bf16 compute, fp32 sharded master weights and fp32
        # gradient reduction, so the sum over ranks does not lose low bits.
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if spec.bf16
              else MixedPrecisionPolicy())
        # Pinned host memory exists only beside a GPU; on a CPU-only machine the offload path runs unpinned.
        offload = CPUOffloadPolicy(pin_memory=layout.device.type == "cuda") if f.cpu_offload else OffloadPolicy()
        shard = dict(mp_policy=mp, offload_policy=offload, reshard_after_forward=f.reshard_after_forward)
        apply_fp8(model, spec.fp8, layout.device, fsdp=True)  # on the meta model: FSDP2 then shards the FP8 linears
        wrap_blocks(model, spec)
        if layout.ep > 1:  # each MoE layer's experts split over `ep` ranks, an FSDP unit of their own (experts.py)
            shard_experts(model, layout, shard)
        for block in model.layers:
            fully_shard(block, mesh=mesh, **shard)
        # The root (embeddings, final norm, head) stays gathered from its forward to its backward: its
        # weights are needed again at once, and the chunked loss reads the head weight after
        # model.hidden(), which is registered to gather them like forward() does.
        fully_shard(model, mesh=mesh, **{**shard, "reshard_after_forward": False})
        register_fsdp_forward_method(model, "hidden")
        model.to_empty(device="cpu" if f.cpu_offload else layout.device)
        full = full_initial_state(model, initial_state, layout)
        set_model_state_dict(model, full or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        self.model = self.module = model
        self.optimizer = build_optimizer(optimizer_groups(model, spec), spec.optim, layout.device)

    def forward_backward(self, batch: dict, loss_fn: LossFn, sync: bool) -> dict:
        if self.sharded:
            self.model.set_requires_gradient_sync(sync or not self.spec.fsdp.defer_grad_sync)
        with self.autocast():
            loss, stats = loss_fn(self.model, batch)
        loss.backward()
        return stats

    def step(self, lr: float) -> float:
        norm = clip_and_step(self.optimizer, lr, self.spec.grad_clip)
        if self.sharded:
            after_fsdp_step(self.model, self.spec.fp8)  # FP8 all-gather scales of the new weights (tensorwise)
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _own_files(self, path: Path) -> list[Path]:
        # DCP's file system writer names each rank's data files __<rank>_<n>.distcp; rank 0's
        # coordinator also writes .metadata, which the checkpoint's publisher hashes.
        return sorted((path / DCP_DIR).glob(f"__{self.layout.rank}_*.distcp"))

    def save(self, path: Path) -> list[Path]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / DCP_DIR))
        return self._own_files(path)

    def save_async(self, path: Path):
        """The shards are copied now into host buffers kept from the last checkpoint (pinned from a GPU;
        DCP's own staging allocates pageable memory at every save, an 11 s training stall at 1B on an
        H200 against 0.3 s: docs/reliability.md), then written by DCP's thread; the returned function
        waits for this rank's files."""
        self._snapshot = cpu_snapshot(get_state_dict(self.model, self.optimizer), into=self._snapshot)
        model_sd, optim_sd = self._snapshot
        result = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / DCP_DIR),
                                process_group=self._save_group, async_stager=_AlreadyStaged())
        future = getattr(result, "upload_completion", result)  # torch >= 2.12 may return an AsyncSaveResponse

        def finish() -> list[Path]:
            future.result()
            return self._own_files(path)
        return finish

    def load(self, path: Path, optimizer: bool) -> None:
        if not (path / DCP_DIR / ".metadata").is_file():
            raise UserError(f"{path}: no {DCP_DIR}/.metadata; was it saved with train.engine=fsdp2?")
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd} if optimizer else {"model": model_sd}
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))  # reshards to this world size
        if optimizer:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            set_model_state_dict(self.model, state["model"])

    def full_state_dict(self) -> dict:
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def targets(self, pattern: str) -> list[Target]:
        """Each parameter is a DTensor sharded on dim 0 (in torch.chunk pieces; an expert tensor under expert
        parallelism twice, over ep and then over dp_out, which still leaves each rank a contiguous run of
        rows); the optimizer updates the local shard in place (a bf16 compute copy is cast from it at every
        all-gather)."""
        import re

        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if not self.sharded:
            return whole_targets(self.module, pattern)
        for m in self.module.modules():  # a forward without backward (evaluation) leaves the root gathered
            if isinstance(m, FSDPModule):
                m.reshard()
        out = []
        for name, p in self.module.named_parameters():
            if not re.fullmatch(pattern, name):
                continue
            if any(getattr(pl, "dim", None) != 0 for pl in p.placements):
                raise UserError(f"{name} is sharded as {p.placements}; per-parameter state (masks, EMAs, frozen rows) "
                                "supports FSDP2's dim-0 sharding only")
            local = p.to_local().view(-1)
            _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            start = min(offset[0], p.shape[0]) * (p.numel() // max(p.shape[0], 1))
            out.append(Target(name, tuple(p.shape), start, local, [(0, local.numel(), local)]))
        return out

    def sync_written(self, targets: list[Target]) -> None:
        pass


class _AlreadyStaged(AsyncStager):
    """DCP's stager for a state dict that cpu_snapshot already copied to host memory: written as it is
    (DCP's default stager would copy it once more, into new pageable memory)."""
    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict


def consolidate(path: Path) -> dict:
    """The full weights of a DCP checkpoint folder, read in this one process (no process group).
    Only the model's entries are read, not the optimizer's (twice as large)."""
    # torch's own helper for this (used by its DCP tooling); `dcp.load` with a filtering planner drops
    # entries that are not already keys of the dict it fills.
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    folder = Path(path) / DCP_DIR
    if not (folder / ".metadata").is_file():
        raise UserError(f"{path}: no {DCP_DIR}/.metadata; this is not a complete FSDP2 checkpoint")
    state = _load_state_dict_from_keys(keys={"model"}, checkpoint_id=str(folder))
    return {k: v.float().contiguous() for k, v in state["model"].items()}
