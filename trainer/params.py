"""Where each rank keeps its copies of a parameter, under every engine: the flat range of the full
tensor a rank holds and every copy the optimizer writes (the model's parameter, DeepSpeed's fp32
master partition, an FSDP2 shard). Sparsity masks, frozen vocabulary rows and weight EMAs act on
parameters through these `Target`s, so one piece of code serves the local engine, ZeRO-1/2/3 and
FSDP2 alike, and their per-rank pieces are saved and read back at any world size.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import UserError

# Parameter names (of the unwrapped Decoder) for each choice in `sparsity.params`. Norms are never pruned;
# "all" is every parameter.
PARAM_PATTERNS = {
    "attention": r"layers\.\d+\.attention\.w[qkvo]\.weight",
    "mlp": r"layers\.\d+\.feed_forward\.w[123]\.weight",
    "embeddings": r"tok_embeddings\.weight",
    "output": r"output\.weight",
    "all": r".*",
}


@dataclass
class Target:
    """One parameter as this rank holds it: the flat range [start, start + values.numel()) of the full
    tensor (`values`: its master copy), and every copy the optimizer writes, as (lo, hi, view of
    elements lo..hi of the range)."""
    name: str
    shape: tuple
    start: int
    values: torch.Tensor
    copies: list


def _selected(module, pattern: str) -> list:
    return [(n, p) for n, p in module.named_parameters() if re.fullmatch(pattern, n)]


def _unwrap(engine):
    """(plain module, optimizer) of an engine: LocalEngine keeps `inner`; DeepSpeed wraps in `.module`."""
    model = getattr(engine, "inner", None)
    model = engine.model if model is None else model
    module = getattr(model, "module", model)
    optimizer = getattr(engine, "optimizer", None)
    return module, optimizer


def _offset(view: torch.Tensor, base: torch.Tensor) -> int:
    return (view.data_ptr() - base.data_ptr()) // base.element_size()


def _zero12_targets(params, opt, flats, masters) -> list[Target]:
    """ZeRO-1/2 (and DeepSpeed's BF16 optimizer): full parameters on every rank, views into a flat
    buffer whose rank-th partition has an fp32 master copy. Selection reads the full (replicated)
    parameter; the mask is also applied to the master slice, else the next step would revive it."""
    out = []
    for name, p in params:
        i = next(i for i, f in enumerate(flats) if f.data_ptr() <= p.data_ptr() < f.data_ptr() + f.numel() * f.element_size())
        group = opt.real_dp_process_group[i] if hasattr(opt, "real_dp_process_group") else None
        size, rank, off = masters[i].numel(), dist.get_rank(group), _offset(p.data, flats[i])
        full = p.data.view(-1)
        copies = [(0, full.numel(), full)]
        lo, hi = max(off, rank * size), min(off + full.numel(), (rank + 1) * size)
        if lo < hi:
            copies.append((lo - off, hi - off, masters[i][lo - rank * size:hi - rank * size]))
        out.append(Target(name, tuple(p.shape), 0, full, copies))
    return out


def _zero3_targets(params, opt) -> list[Target]:
    """ZeRO-3: each rank holds partition `rank` of every parameter (ds_tensor, inside a flat
    sub-group buffer) and its fp32 master in the matching slice of the fp32 flat buffer."""
    out = []
    for name, p in params:
        part = p.ds_tensor
        i = next(i for i, g in enumerate(opt.fp16_partitioned_groups) if any(t is part for t in g))
        flat16, flat32 = opt.fp16_partitioned_groups_flat[i], opt.fp32_partitioned_groups_flat[i]
        start = dist.get_rank(p.ds_process_group) * part.ds_numel
        n = max(0, min(part.ds_numel, p.ds_numel - start))
        off = _offset(part, flat16)
        master = flat32[off:off + n]
        copies = [(0, n, master)] + ([(0, n, part.view(-1)[:n])] if flat32.data_ptr() != flat16.data_ptr() else [])
        out.append(Target(name, tuple(p.ds_shape), start, master, copies))
    return out


def _fsdp2_targets(params) -> list[Target]:
    """FSDP2: each parameter is a DTensor sharded on dim 0 in torch.chunk pieces; the optimizer
    updates the local shard in place (a bf16 compute copy is cast from it at every all-gather)."""
    from torch.distributed.tensor import Shard

    out = []
    for name, p in params:
        if tuple(p.placements) != (Shard(0),):
            raise UserError(f"sparsity: {name} is sharded as {p.placements}; masks support FSDP2's Shard(0) only")
        local = p.to_local().view(-1)
        rows = -(-p.shape[0] // p.device_mesh.size())
        start = min(p.device_mesh.get_local_rank() * rows, p.shape[0]) * (p.numel() // max(p.shape[0], 1))
        out.append(Target(name, tuple(p.shape), start, local, [(0, local.numel(), local)]))
    return out


def collect_targets(engine, kinds: list[str]) -> tuple[list[Target], bool]:
    """(targets, sharded) of the parameters of these kinds (keys of PARAM_PATTERNS): every copy of
    them the optimizer writes, under any engine (trainer/freezing.py holds rows with them too).
    sharded: ranks hold disjoint pieces, so selection needs collectives."""
    from torch.distributed.tensor import DTensor

    module, opt = _unwrap(engine)
    params = _selected(module, "|".join(PARAM_PATTERNS[k] for k in kinds))
    if not params:
        raise UserError(f"sparsity.params={kinds} matches no parameter of this model (tied embeddings have no 'output')")
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return _zero3_targets(params, opt), True
    if hasattr(opt, "single_partition_of_fp32_groups"):
        return _zero12_targets(params, opt, opt.bit16_groups_flat, opt.single_partition_of_fp32_groups), False
    if hasattr(opt, "fp32_groups_flat_partition"):
        return _zero12_targets(params, opt, opt.bf16_groups_flat, opt.fp32_groups_flat_partition), False
    if isinstance(params[0][1], DTensor):
        return _fsdp2_targets(params), True
    return [Target(n, tuple(p.shape), 0, p.data.view(-1), [(0, p.numel(), p.data.view(-1))]) for n, p in params], False


def read_pieces(files: list[Path], targets: list[Target], dtype: torch.dtype = torch.bool) -> dict:
    """Assemble this rank's range of each tensor (masks, EMAs) from the flat pieces any world size wrote
    (each file's metadata gives every piece's start in the full tensor)."""
    from safetensors import safe_open

    masks = {t.name: torch.zeros(t.values.numel(), dtype=dtype, device=t.values.device) for t in targets}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            starts = sf.metadata()
            for t in targets:
                if t.name not in starts:
                    continue
                piece = sf.get_slice(t.name)
                p0, p1, me0, me1 = int(starts[t.name]), int(starts[t.name]) + piece.get_shape()[0], t.start, t.start + t.values.numel()
                lo, hi = max(p0, me0), min(p1, me1)
                if lo < hi:
                    masks[t.name][lo - me0:hi - me0] = piece[lo - p0:hi - p0].to(masks[t.name].device)
    return masks


def regather_persistent(engine, targets) -> None:
    """ZeRO-3 keeps small ("persistent") parameters gathered between steps, and forwards read that
    full copy: release it and gather it again from the masked partitions (a gather alone skips
    parameters that are still available)."""
    module, _ = _unwrap(engine)
    names = {t.name for t in targets}
    persistent = [p for n, p in module.named_parameters() if n in names and getattr(p, "ds_persist", False)]
    if persistent:
        persistent[0].partition(persistent)
        persistent[0].all_gather(persistent)


