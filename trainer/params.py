"""Where each rank keeps its copies of a parameter, under every engine: the flat range of the full
tensor a rank holds and every copy the optimizer writes (the model's parameter, DeepSpeed's fp32
master partition, an FSDP2 shard). Each engine lists its own (`Engine.targets`); sparsity masks,
frozen vocabulary rows and weight EMAs act on parameters through these `Target`s, so one piece of
code serves the local engine, ZeRO-1/2/3 and FSDP2 alike, and their per-rank pieces are saved and
read back at any world size.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

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


def collect_targets(engine, kinds: list[str]) -> tuple[list[Target], bool]:
    """(targets, sharded) of the parameters of these kinds (keys of PARAM_PATTERNS): every copy of
    them the optimizer writes, under any engine (trainer/freezing.py holds rows with them too).
    sharded: ranks hold disjoint pieces, so selection needs collectives."""
    targets = engine.targets("|".join(PARAM_PATTERNS[k] for k in kinds))
    if not targets:
        raise UserError(f"sparsity.params={kinds} matches no parameter of this model (tied embeddings have no 'output')")
    return targets, engine.sharded


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
