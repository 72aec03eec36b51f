"""What the training loop reads: DataConfig, validation of prepared directories, the train loader
(mixtures, phases, replay, exact resume at any world size) and the validation loaders.

The global sample stream (docs/data.md has the full argument):
  * Global sample g (g = 0, 1, 2, ...) belongs to the domain drawn from a counter-based hash of
    (seed, g) under the weights in effect at g (base weights, a phase, or an online override).
  * Each domain d keeps a cursor c_d: the number of its samples drawn so far. Its c-th sample is
    the sample `perm(seed, d, epoch)[c % N_d]` of its train split (epoch = c // N_d), so epochs wrap
    and every sample appears once per epoch.
  * Micro-batch j of rank r holds global samples [P + j*B*W + r*B, P + j*B*W + (r+1)*B) where P is
    the resume position. A step of A micro-batches per rank covers the G = A*B*W consecutive global
    samples [P + k*G, P + (k+1)*G): the same set whatever W (and A) as long as G is fixed.
  * The state (position P + cursors) is the same on every rank and says nothing about W.

Training-side module: it must not import `datasets` (absent on the GPU machine).
"""
from __future__ import annotations

import collections
import json
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from ..errors import UserError

STATE_VERSION = 1


@dataclass
class DomainConfig:
    name: str = ""          # label used in metrics (val/<name>), phase weights and loader state
    path: str = ""          # a directory written by `cptrain data prepare`
    weight: float = 1.0     # relative sampling weight within its group (domains, or replay)


@dataclass
class PhaseConfig:
    until_tokens: int = 0   # the phase covers global samples starting before this many tokens
    weights: dict[str, float] = field(default_factory=dict)  # per-domain weight overrides by name
    replay_fraction: Optional[float] = None  # overrides DataConfig.replay_fraction in this phase


@dataclass
class DataConfig:
    domains: list[DomainConfig] = field(default_factory=list)      # the training mixture
    val_domains: list[DomainConfig] = field(default_factory=list)  # extra validation-only domains
    replay: list[DomainConfig] = field(default_factory=list)       # old-domain data mixed into training
    replay_fraction: float = 0.0   # share of training samples drawn from `replay` (split by weight)
    phases: list[PhaseConfig] = field(default_factory=list)  # weight changes at token boundaries, in order
    seq_len: int = 2048            # tokens per sample (each MDS sample holds seq_len + 1)
    shuffle: bool = True           # shuffle each domain per epoch (False: read in prepared order)
    num_workers: int = 0           # DataLoader worker processes per rank
    verify_shards: bool = True     # check each shard's xxh64 against index.json on first use


# ---------------------------------------------------------------- reading prepared splits

_READERS: dict[str, "SplitReader"] = {}
_shm_cleaned = False


class SplitReader:
    """One split folder (`DIR/train` or `DIR/val`): its shard table, lazy integrity checks, and
    random access through one StreamingDataset. One reader per folder per process: two
    StreamingDatasets over the same local folder in one process collide in shared memory."""

    def __init__(self, root: Path):
        self.root = root
        index = root / "index.json"
        if not index.exists():
            raise UserError(f"{index}: missing; the prepare run did not finish - re-run `cptrain data prepare`")
        self.shards = json.loads(index.read_text())["shards"]
        self.bounds = np.cumsum([s["samples"] for s in self.shards])
        self.num_samples = int(self.bounds[-1]) if len(self.bounds) else 0
        self._verified: set[int] = set()
        self._dataset = None

    def _file_of(self, shard: dict) -> tuple[Path, dict]:
        """The shard file on disk with its index entry (raw if present, else the compressed one)."""
        for key in ("raw_data", "zip_data"):
            info = shard.get(key)
            if info and (self.root / info["basename"]).exists():
                return self.root / info["basename"], info
        name = shard["raw_data"]["basename"]
        raise UserError(f"{self.root / name}: shard missing; re-run `cptrain data prepare` for {self.root.parent}")

    def check_files(self) -> None:
        """Every shard present with the size index.json records (cheap: no reading)."""
        for shard in self.shards:
            path, info = self._file_of(shard)
            if path.stat().st_size != info["bytes"]:
                raise UserError(f"{path}: shard is {path.stat().st_size} bytes, index.json says {info['bytes']}; "
                                f"the data is damaged - re-run `cptrain data prepare` for {self.root.parent}")

    def _verify(self, shard_id: int) -> None:
        import xxhash
        path, info = self._file_of(self.shards[shard_id])
        expected = info.get("hashes", {}).get("xxh64")
        if expected and xxhash.xxh64(path.read_bytes()).hexdigest() != expected:
            raise UserError(f"{path}: shard is corrupt (xxh64 differs from index.json); "
                            f"re-run `cptrain data prepare` for {self.root.parent}")
        self._verified.add(shard_id)

    def dataset(self):
        global _shm_cleaned
        if self._dataset is None:
            from .streaming_compat import clean_stale_shared_memory, streaming
            if not _shm_cleaned:  # leftovers of killed runs would block prefix registration
                clean_stale_shared_memory()
                _shm_cleaned = True
            self._dataset = streaming.StreamingDataset(local=str(self.root), remote=None, shuffle=False)
        return self._dataset

    def get(self, idx: int, verify: bool) -> dict:
        shard_id = int(np.searchsorted(self.bounds, idx, side="right"))
        if verify and shard_id not in self._verified:
            self._verify(shard_id)
        return self.dataset()[idx]


def open_split(root: Path, with_dataset: bool = False) -> SplitReader:
    """The process-wide reader of a split folder. `with_dataset` builds its StreamingDataset now:
    the builders below do so for every domain in config order, because streaming's shared-memory
    setup barriers across ranks and would deadlock if ranks built datasets in different orders."""
    key = str(Path(root).resolve())
    if key not in _READERS:
        _READERS[key] = SplitReader(Path(key))
    if with_dataset:
        _READERS[key].dataset()
    return _READERS[key]


# ---------------------------------------------------------------- validation

def _read_manifest(d: DomainConfig) -> dict:
    path = Path(d.path) / "manifest.json"
    if not path.exists():
        raise UserError(f"{path}: missing (domain '{d.name}'); run `cptrain data prepare --out {d.path}` "
                        "or fix data path")
    return json.loads(path.read_text())


def _all_domains(cfg: DataConfig) -> list[DomainConfig]:
    """Training domains, then replay, then validation-only ones (deduplicated by name)."""
    seen, out = set(), []
    for d in [*cfg.domains, *cfg.replay, *cfg.val_domains]:
        if d.name not in seen:
            seen.add(d.name)
            out.append(d)
    return out


def _check_mixture(cfg: DataConfig) -> None:
    names = [d.name for d in cfg.domains + cfg.replay]
    if not cfg.domains:
        raise UserError("data.domains is empty; list at least one prepared directory to train on")
    if len(set(names)) != len(names) or "" in names:
        raise UserError(f"data: domain names must be unique and non-empty, got {names}")
    fractions = [cfg.replay_fraction] + [p.replay_fraction for p in cfg.phases if p.replay_fraction is not None]
    if any(not 0 <= f < 1 for f in fractions) or (not cfg.replay and any(fractions)):
        raise UserError("data.replay_fraction must be in [0, 1) and needs data.replay domains when > 0")
    for i, p in enumerate(cfg.phases):
        unknown = set(p.weights) - set(names)
        if unknown:
            raise UserError(f"data.phases[{i}].weights names unknown domains {sorted(unknown)}; use {names}")
        if i and p.until_tokens <= cfg.phases[i - 1].until_tokens:
            raise UserError("data.phases must have increasing until_tokens")
    if any(d.weight < 0 for d in cfg.domains + cfg.replay):
        raise UserError("data: domain weights must be >= 0")
    clash = [d.name for d in cfg.val_domains if d.name in names]
    if clash:
        raise UserError(f"data.val_domains {clash} reuse training/replay domain names; training domains are "
                        "validated on their own val split already - drop them or rename")


def validate_data(cfg: DataConfig, vocab_size: int) -> dict:
    """Check every domain's prepared directory against the config; returns the first manifest."""
    _check_mixture(cfg)
    manifests = []
    for d in _all_domains(cfg):
        m = _read_manifest(d)
        where = Path(d.path) / "manifest.json"
        if m.get("seq_len") != cfg.seq_len:
            raise UserError(f"{where}: prepared with seq_len {m.get('seq_len')} but data.seq_len is "
                            f"{cfg.seq_len}; set data.seq_len={m.get('seq_len')} or re-run prepare")
        if m["tokenizer"]["vocab_size"] > vocab_size:
            raise UserError(f"{where}: tokenizer vocabulary {m['tokenizer']['vocab_size']} exceeds the "
                            f"model's vocab_size {vocab_size}; raise model vocab_size or use the model's tokenizer")
        for split in ("train", "val"):
            if m["splits"][split]["samples"]:
                open_split(Path(d.path) / split).check_files()
        manifests.append(m)
    ids = {m["tokenizer"]["sha256"] for m in manifests}
    if len(ids) > 1:
        raise UserError(f"data: domains were prepared with different tokenizers ({len(ids)} kinds); "
                        "prepare every domain with the same --tokenizer")
    return manifests[0]


# ---------------------------------------------------------------- the mixture

def _uniform(seed: int, idx: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, global index) -> U[0, 1): a pure function of the index, so any rank
    (and any resumed run) draws the same domain for sample g without replaying a generator."""
    with np.errstate(over="ignore"):
        z = idx.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
        z = (z + np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def mixture_probs(cfg: DataConfig, weights: dict[str, float], replay_fraction: float) -> np.ndarray:
    """Probabilities over [*domains, *replay] given per-name weights and the replay share."""
    def group(ds, share):
        w = np.array([weights.get(d.name, d.weight) for d in ds], dtype=np.float64)
        return w / w.sum() * share if w.sum() > 0 else np.zeros(len(ds))
    p = np.concatenate([group(cfg.domains, 1.0 - replay_fraction), group(cfg.replay, replay_fraction)])
    if p.sum() <= 0:
        raise UserError("data: every domain weight is 0 in some phase; give one domain a positive weight")
    return p / p.sum()


def weights_at(cfg: DataConfig, tokens: int) -> tuple[dict[str, float], float]:
    """The (weights, replay_fraction) of the phase holding token offset `tokens`; base after the last."""
    for p in cfg.phases:
        if tokens < p.until_tokens:
            rf = cfg.replay_fraction if p.replay_fraction is None else p.replay_fraction
            return p.weights, rf
    return {}, cfg.replay_fraction


class Mixture:
    """Draws the domain of global samples and tracks per-domain cursors (the loader state)."""

    def __init__(self, cfg: DataConfig, seed: int, sizes: list[int], state: dict | None):
        self.cfg, self.seed, self.sizes = cfg, seed, sizes
        self.names = [d.name for d in cfg.domains + cfg.replay]
        state = state or {}
        if state and state.get("seed") != seed:
            raise UserError(f"data: the checkpoint's loader was seeded with {state.get('seed')}, this run "
                            f"with {seed}; resume with the same seed")
        self.position = int(state.get("position", 0))
        # Domains absent from the state (added at resume) start at 0; dropped ones are forgotten.
        self.cursors = {n: int(state.get("cursors", {}).get(n, 0)) for n in self.names}
        self.override = state.get("weights_override")
        for name, n in state.get("num_samples", {}).items():
            if name in self.names and n != sizes[self.names.index(name)]:
                warnings.warn(f"data: domain '{name}' had {n} training samples when this state was saved and "
                              f"has {sizes[self.names.index(name)]} now (re-prepared?); its order from here "
                              "on differs from the original run")
        self._perm: dict[str, tuple[int, np.ndarray]] = {}

    def probs_for(self, g: int) -> np.ndarray:
        if self.override is not None:
            return mixture_probs(self.cfg, self.override["weights"], self.override["replay_fraction"])
        return mixture_probs(self.cfg, *weights_at(self.cfg, g * self.cfg.seq_len))

    def domains_of(self, start: int, n: int) -> np.ndarray:
        """Domain index of global samples [start, start + n)."""
        idx = np.arange(start, start + n, dtype=np.int64)
        u = _uniform(self.seed, idx)
        out = np.empty(n, dtype=np.int64)
        # Weights change only at phase boundaries: draw per run of constant weights.
        i = 0
        while i < n:
            g = start + i
            probs = self.probs_for(g)
            end = n if self.override is not None else min(n, self._phase_end(g) - start)
            cdf = np.cumsum(probs)
            out[i:end] = np.minimum(np.searchsorted(cdf, u[i:end], side="right"), len(probs) - 1)
            i = end
        return out

    def _phase_end(self, g: int) -> int:
        """First global index after g whose weights may differ (the next phase boundary)."""
        tokens = g * self.cfg.seq_len
        for p in self.cfg.phases:
            if tokens < p.until_tokens:
                return -(-p.until_tokens // self.cfg.seq_len)  # first g with g*seq_len >= until
        return 1 << 62

    def sample_index(self, d: int, cursor: int) -> int:
        name, n = self.names[d], self.sizes[d]
        epoch, k = divmod(cursor, n)
        if not self.cfg.shuffle:
            return k
        cached = self._perm.get(name)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, zlib.crc32(name.encode()), epoch])
            cached = (epoch, rng.permutation(n))
            self._perm[name] = cached
        return int(cached[1][k])

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next n global samples as (domain, sample index); advances the state."""
        out = []
        for d in self.domains_of(self.position, n):
            name = self.names[d]
            out.append((int(d), self.sample_index(int(d), self.cursors[name])))
            self.cursors[name] += 1
        self.position += n
        return out

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "seed": self.seed, "position": self.position,
                "cursors": dict(self.cursors), "weights_override": self.override,
                "num_samples": dict(zip(self.names, self.sizes))}


# ---------------------------------------------------------------- batches

class _Samples(torch.utils.data.Dataset):
    """Map-style view over several readers, indexed by (domain, sample index)."""

    def __init__(self, readers: list[SplitReader] | dict[int, SplitReader], seq_len: int, verify: bool):
        self.readers, self.seq_len, self.verify = readers, seq_len, verify

    def __getitem__(self, item: tuple[int, int]):
        d, k = item
        sample = self.readers[d].get(k, self.verify)
        tokens = sample["tokens"]
        if len(tokens) != self.seq_len + 1:
            raise UserError(f"{self.readers[d].root}: sample {k} has {len(tokens)} tokens, expected "
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
    # Workers are forked so they inherit the readers (and their StreamingDatasets) as built.
    ctx = "fork" if num_workers and sys.platform.startswith("linux") else None
    return torch.utils.data.DataLoader(samples, batch_sampler=batch_sampler, num_workers=num_workers,
                                       collate_fn=collate, multiprocessing_context=ctx)


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

    def __init__(self, cfg: DataConfig, readers: list[SplitReader], seed: int, micro_batch_size: int,
                 rank: int, world_size: int, state: dict | None):
        self.cfg, self.readers, self.seed = cfg, readers, seed
        self.b, self.rank, self.world = micro_batch_size, rank, world_size
        sizes = [r.num_samples for r in readers]
        self._state = Mixture(cfg, seed, sizes, state).state_dict()
        self._pending: collections.deque = collections.deque()
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._pending.clear()
            samples = _Samples(self.readers, self.cfg.seq_len, self.cfg.verify_shards)
            mixture = Mixture(self.cfg, self.seed, [r.num_samples for r in self.readers], self._state)
            plan = _plan(mixture, self.b, self.rank, self.world, self._pending)
            self._it = iter(_data_loader(samples, plan, self.cfg.num_workers))
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


def build_train_loader(cfg: DataConfig, *, micro_batch_size: int, rank: int, world_size: int, seed: int,
                       state: dict | None = None) -> TrainLoader:
    """Call after torch.distributed is initialized (streaming's shared-memory setup barriers)."""
    _check_mixture(cfg)
    readers = [open_split(Path(d.path) / "train") for d in cfg.domains + cfg.replay]
    for r in readers:
        if r.num_samples == 0:
            raise UserError(f"{r.root}: no training samples; prepare more text or a smaller --seq-len")
        r.dataset()  # now, in config order, on every rank (see open_split)
    return TrainLoader(cfg, readers, seed, micro_batch_size, rank, world_size, state)


def _val_batches(reader: SplitReader, d: int, n: int, seq_len: int, verify: bool, b: int, rank: int, world: int):
    samples = _Samples({d: reader}, seq_len, verify)
    per_rank = n // world
    lo = rank * per_rank
    for start in range(lo, lo + per_rank, b):
        yield collate([samples[(d, k)] for k in range(start, min(start + b, lo + per_rank))])


def split_batches(folder: Path, split: str, micro_batch_size: int, max_samples: int | None = None,
                  rank: int = 0, world_size: int = 1) -> tuple[dict, Iterator[dict]]:
    """(manifest, batches) of the first max_samples samples (all when None) of one split of a
    prepared directory, in order, this rank's contiguous share of them: `cptrain eval`'s input."""
    folder = Path(folder)
    manifest = _read_manifest(DomainConfig(name=folder.name, path=str(folder)))
    root = folder / split
    if not (root / "index.json").exists():
        raise UserError(f"{root}: no such split in {folder} (it has {', '.join(k for k in manifest['splits'])}); "
                        "pass --split train or val")
    reader = open_split(root, with_dataset=True)
    n = reader.num_samples if max_samples is None else min(max_samples, reader.num_samples)
    if n < world_size:
        raise UserError(f"{root}: {n} samples, fewer than {world_size} ranks; evaluate a larger split or on fewer ranks")
    return manifest, _val_batches(reader, 0, n - n % world_size, manifest["seq_len"], True, micro_batch_size, rank, world_size)


def build_val_loaders(cfg: DataConfig, *, micro_batch_size: int, rank: int, world_size: int,
                      max_samples: int) -> dict[str, Callable[[], Iterator[dict]]]:
    """Per domain: a function giving a fresh pass over the first max_samples val samples.

    The samples are rounded down to a multiple of world_size so every rank runs the same number
    of batches (sharded engines need matching forward calls); ranks take contiguous slices.
    """
    out = {}
    for d, dom in enumerate(_all_domains(cfg)):
        root = Path(dom.path) / "val"
        reader = open_split(root, with_dataset=True) if (root / "index.json").exists() else None
        n = min(max_samples, reader.num_samples if reader else 0)
        if n < world_size:
            warnings.warn(f"{root}: {n} validation samples, fewer than {world_size} ranks; "
                          f"domain '{dom.name}' is not evaluated")
            continue
        out[dom.name] = (lambda r=reader, d=d, n=n - n % world_size:
                         _val_batches(r, d, n, cfg.seq_len, cfg.verify_shards, micro_batch_size, rank, world_size))
    return out
