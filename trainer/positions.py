"""Validation loss by token position (eval.position_buckets, `cptrain eval --position-buckets`): does a
longer context help the late positions of a row? Position p is the loss of predicting token p + 1
of the row from tokens 0..p; bounds [0, 1024, 4096] make the buckets [0, 1024), [1024, 4096) and
[4096, row end), logged as `pos0-1024`, `pos1024-4096`, `pos4096-<row length>`. Under context
parallelism a rank holds some positions of each row (its split's `index`): they are bucketed by their
place in the row, and the sums add up over ranks like the domain means.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class Buckets:
    bounds: tuple[int, ...]  # increasing starts of the buckets
    row_len: int  # where the last bucket ends

    @classmethod
    def of(cls, bounds, row_len: int, where: str) -> "Buckets | None":
        """The buckets of `bounds` over rows of row_len targets (None without bounds); bad bounds in one line."""
        if not bounds:
            return None
        bounds = check_bounds(bounds, where)
        if bounds[-1] >= row_len:
            raise UserError(f"{where}: position bucket {bounds[-1]} starts past the rows' last position {row_len - 1} "
                            f"(sequence length {row_len}); drop it or evaluate on longer rows")
        return cls(bounds, row_len)

    @property
    def names(self) -> list[str]:
        ends = self.bounds[1:] + (self.row_len,)
        return [f"pos{lo}-{hi}" for lo, hi in zip(self.bounds, ends)]

    def sums(self, losses: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[2 * buckets] float64: the summed losses of each bucket, then its target counts, of
        losses [B, S] at row positions [S] (positions before the first bound count nowhere)."""
        k = len(self.bounds)
        bucket = torch.bucketize(positions, torch.tensor(self.bounds, device=positions.device), right=True) - 1  # [S]
        inside = bucket >= 0
        bucket = bucket[inside]
        out = torch.zeros(2 * k, dtype=torch.float64, device=losses.device)
        out[:k].index_add_(0, bucket, losses.double().sum(0)[inside])
        out[k:].index_add_(0, bucket, torch.full_like(bucket, losses.shape[0], dtype=torch.float64))
        return out

    def means(self, sums: torch.Tensor) -> dict:
        """{"pos<lo>-<hi>": mean loss} of summed sums() (buckets no target fell into are left out)."""
        k = len(self.bounds)
        return {name: (sums[i] / sums[k + i]).item() for i, name in enumerate(self.names) if sums[k + i] > 0}


def check_bounds(bounds, where: str) -> tuple[int, ...]:
    """Bucket starts as a tuple of ints, from a list or a comma-separated string ("0,1024,4096")."""
    if isinstance(bounds, str):
        try:
            bounds = [int(b) for b in bounds.split(",")]
        except ValueError:
            raise UserError(f"{where}: {bounds!r} must be comma-separated token positions, e.g. 0,1024,4096") from None
    bounds = tuple(bounds)
    if bounds[0] < 0 or any(b >= a for a, b in zip(bounds[1:], bounds)):
        raise UserError(f"{where}: position buckets {list(bounds)} must be increasing positions from 0 on (e.g. 0,1024,4096)")
    return bounds


def row_positions(batch: dict, losses: torch.Tensor) -> torch.Tensor:
    """The row positions of the columns of a batch's losses [B, S]: this rank's under context
    parallelism (trainer/engines/context.py), else 0..S-1."""
    if "split" in batch:
        return batch["split"].index
    return torch.arange(losses.shape[1], device=losses.device)
