"""What the training loop and `cptrain eval` read: the train loader (exact resume at any world
size, online reweighting) and the validation passes, over the splits validate_data opened.

Ranks: micro-batch j of rank r holds global samples [P + j*B*W + r*B, P + j*B*W + (r+1)*B) where P
is the resume position. A step of A micro-batches per rank covers the G = A*B*W consecutive global
samples [P + k*G, P + (k+1)*G): the same set whatever W (and A) as long as G is fixed. Which domain
and sample each global index is comes from mixture.py; docs/data.md has the full argument.

Training-side module: it must not import `datasets` (absent on the GPU machine).
"""
from __future__ import annotations

import collections
import json
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import UserError
from .cache import DEFAULT_DIR, NodeCache
from .config import DomainConfig, PreparedData, read_manifest
from .mixture import Mixture, mixture_probs
from .remote import is_url, join
from .shards import ShardSplit


class _Samples(torch.utils.data.Dataset):
    """Map-style view over several splits, indexed by (domain, sample index)."""

    def __init__(self, splits: list[ShardSplit] | dict[int, ShardSplit], seq_len: int):
        self.splits, self.seq_len = splits, seq_len

    def __getitem__(self, item: tuple[int, int]):
        d, k = item
        sample = self.splits[d].get(k)
        tokens = sample["tokens"]
        if len(tokens) != self.seq_len + 1:
            raise UserError(f"{self.splits[d].root}: sample {k} has {len(tokens)} tokens, expected "
                            f"seq_len + 1 = {self.seq_len + 1}; re-run prepare with --seq-len {self.seq_len}")
        return d, k, tokens, sample["doc_starts"]


def collate(samples: list) -> dict[str, torch.Tensor]:
    """-> tokens [B, S+1] int64, doc_ids [B, S+1] int32, sample_id [B] int64, domain [B] int64."""
    tokens = np.stack([s[2] for s in samples]).astype(np.int64)
    marks = np.zeros(tokens.shape, dtype=np.int32)
    for row, s in enumerate(samples):
        marks[row, s[3][1:]] = 1  # doc_starts always holds 0: the first document has id 0
    return {"tokens": torch.from_numpy(tokens),
            "doc_ids": torch.from_numpy(np.cumsum(marks, axis=1, dtype=np.int32)),
            "sample_id": torch.tensor([s[1] for s in samples], dtype=torch.int64),
            "domain": torch.tensor([s[0] for s in samples], dtype=torch.int64)}


def _data_loader(samples: _Samples, batch_sampler, num_workers: int):
    # Workers are forked so they inherit the splits as built (they hold no open files).
    ctx = "fork" if num_workers and sys.platform.startswith("linux") else None
    # A generator of its own: each new iterator draws its workers' base seed from it, not from the global
    # RNG, which training owns (stochastic rounding; exact resume restores it). Otherwise the iterator a
    # resumed run opens, or any evaluation pass, shifts the global stream.
    return torch.utils.data.DataLoader(samples, batch_sampler=batch_sampler, num_workers=num_workers,
                                       collate_fn=collate, multiprocessing_context=ctx, generator=torch.Generator())


def _plan(mixture: Mixture, b: int, rank: int, world: int, pending: collections.deque):
    """Batch sampler: this rank's slice of each round of B*W global samples; records the state
    after each planned batch. A free function: a generator method would tie the loader and its
    DataLoader iterator in a reference cycle, and collecting that cycle stalls worker shutdown."""
    lo = rank * b
    while True:
        items = mixture.take(b * world)[lo:lo + b]
        pending.append(mixture.state_dict())
        yield items


class TrainLoader:
    """Infinite iterator of this rank's micro-batches; `state_dict()` is the position after the
    last batch handed out (prefetched batches do not count)."""

    def __init__(self, data: PreparedData, seed: int, micro_batch_size: int, rank: int, world_size: int,
                 state: dict | None):
        self.cfg, self.b, self.rank, self.world = data.cfg, micro_batch_size, rank, world_size
        splits = data.train_splits()
        self._samples = _Samples(splits, self.cfg.seq_len)
        self._mixture = Mixture(self.cfg, seed, [s.num_samples for s in splits], state)
        self._state = self._mixture.state_dict()
        self._pending: collections.deque = collections.deque()
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:  # (re)start the plan at the last batch handed out
            self._pending.clear()
            self._mixture.rewind(self._state)
            plan = _plan(self._mixture, self.b, self.rank, self.world, self._pending)
            self._it = iter(_data_loader(self._samples, plan, self.cfg.num_workers))
        batch = next(self._it)
        self._state = self._pending.popleft()
        return batch

    def state_dict(self) -> dict:
        return json.loads(json.dumps(self._state))

    def set_weights(self, weights: dict[str, float], replay_fraction: float | None = None) -> None:
        """Replace the configured weights/phases from the next global sample on (online domain
        reweighting). Every rank must call it at the same point; the override is saved in the
        state, so a resumed run continues with it."""
        unknown = set(weights) - {d.name for d in self.cfg.domains + self.cfg.replay}
        if unknown:
            raise UserError(f"set_weights: unknown domains {sorted(unknown)}")
        rf = self.cfg.replay_fraction if replay_fraction is None else replay_fraction
        mixture_probs(self.cfg, weights, rf)  # rejects all-zero weights now, not mid-run
        self._state = {**self._state, "weights_override": {"weights": dict(weights), "replay_fraction": rf}}
        self._it = None  # drop prefetched batches: they were drawn under the old weights


def build_train_loader(data: PreparedData, *, micro_batch_size: int, rank: int, world_size: int, seed: int,
                       state: dict | None = None) -> TrainLoader:
    """This rank's loader over `validate_data`'s splits; `state` is a saved `state_dict()` to resume."""
    return TrainLoader(data, seed, micro_batch_size, rank, world_size, state)


def _val_batches(split: ShardSplit, d: int, n: int, seq_len: int, b: int, rank: int, world: int):
    samples = _Samples({d: split}, seq_len)
    per_rank = n // world
    lo = rank * per_rank
    for start in range(lo, lo + per_rank, b):
        yield collate([samples[(d, k)] for k in range(start, min(start + b, lo + per_rank))])


def split_batches(folder: str | Path, split: str, micro_batch_size: int, max_samples: int | None = None,
                  rank: int = 0, world_size: int = 1, cache: NodeCache | None = None) -> tuple[dict, Iterator[dict]]:
    """(manifest, batches) of the first max_samples samples (all when None) of one split of a
    prepared directory (a path or a URL, read through `cache`), in order, this rank's contiguous
    share of them: `cptrain eval`'s input."""
    folder = str(folder)
    if is_url(folder):
        cache = cache or NodeCache.open(DEFAULT_DIR, 0)
    manifest = read_manifest(DomainConfig(name=folder.rstrip("/").rsplit("/", 1)[-1], path=folder), cache)
    if not manifest["splits"].get(split, {}).get("samples"):
        raise UserError(f"{join(folder, split)}: no such split in {folder} (it has "
                        f"{', '.join(k for k, v in manifest['splits'].items() if v['samples'])}); pass --split train or val")
    reader = ShardSplit(join(folder, split), cache=cache)
    n = reader.num_samples if max_samples is None else min(max_samples, reader.num_samples)
    if n < world_size:
        raise UserError(f"{reader.root}: {n} samples, fewer than {world_size} ranks; evaluate a larger split or on fewer ranks")
    return manifest, _val_batches(reader, 0, n - n % world_size, manifest["seq_len"], micro_batch_size, rank, world_size)


def build_val_loaders(data: PreparedData, *, micro_batch_size: int, rank: int, world_size: int,
                      max_samples: int) -> dict[str, Callable[[], Iterator[dict]]]:
    """Per domain: a function giving a fresh pass over the first max_samples val samples.

    The samples are rounded down to a multiple of world_size so every rank runs the same number
    of batches (sharded engines need matching forward calls); ranks take contiguous slices.
    """
    out = {}
    for d, (dom, split) in enumerate(data.val_splits()):
        n = min(max_samples, split.num_samples if split else 0)
        if n < world_size:
            warnings.warn(f"{join(dom.path, 'val')}: {n} validation samples, fewer than {world_size} ranks; "
                          f"domain '{dom.name}' is not evaluated")
            continue
        out[dom.name] = (lambda s=split, d=d, n=n - n % world_size:
                         _val_batches(s, d, n, data.cfg.seq_len, micro_batch_size, rank, world_size))
    return out
