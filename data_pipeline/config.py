"""The data section of a run (DataConfig and its parts) and its one check against the prepared
directories: `validate_data` returns a PreparedData, which the loaders take as is."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .cache import DEFAULT_DIR, NodeCache
from .remote import check_url, is_url, join, read_bytes
from .shards import ShardSplit
from .tokenizer import HF_TOKENIZER_FILES


@dataclass
class DomainConfig:
    name: str = ""          # label used in metrics (val/<name>), phase weights and loader state
    path: str = ""          # a directory written by `cptrain data prepare`, or its URL (s3://bucket/prefix)
    weight: float = 1.0     # relative sampling weight within its group (domains, or replay)


@dataclass
class PhaseConfig:
    until_tokens: int = 0   # the phase covers global samples starting before this many tokens
    weights: dict[str, float] = field(default_factory=dict)  # per-domain weight overrides by name
    replay_fraction: Optional[float] = None  # overrides DataConfig.replay_fraction in this phase


@dataclass
class SeqLenPhase:
    until_tokens: int = 0   # this length for the steps that start before this many tokens (data_pipeline/seqlen.py)
    seq_len: int = 0        # tokens per row in those steps: each prepared row cut into seq_len / this pieces


@dataclass
class DataConfig:
    domains: list[DomainConfig] = field(default_factory=list)      # the training mixture
    val_domains: list[DomainConfig] = field(default_factory=list)  # extra validation-only domains
    replay: list[DomainConfig] = field(default_factory=list)       # old-domain data mixed into training
    replay_fraction: float = 0.0   # share of training samples drawn from `replay` (split by weight)
    phases: list[PhaseConfig] = field(default_factory=list)  # weight changes at token boundaries, in order
    seq_len: int = 2048            # tokens per sample (each MDS sample holds seq_len + 1)
    seq_len_schedule: list[SeqLenPhase] = field(default_factory=list)  # shorter rows first, in order; then seq_len
    shuffle: bool = True           # shuffle each domain per epoch (False: read in prepared order)
    num_workers: int = 0           # DataLoader worker processes per rank
    verify_shards: bool = True     # check each shard's xxh64 against index.json on first use
    cache_dir: str = DEFAULT_DIR   # node-local folder for the shards of domains given as URLs
    cache_limit_gb: float = 0.0    # evict least recently used cached shards above this size (0: no limit)


@dataclass
class PreparedData:
    """A checked DataConfig with what checking it opened; built once per run by validate_data."""
    cfg: DataConfig
    manifest: dict                              # the first domain's manifest.json
    splits: dict[str, dict[str, ShardSplit]]    # domain name -> {"train"/"val": split}, non-empty splits only
    cache: NodeCache | None = None              # where shards of URL domains are kept (None: all local)

    def train_splits(self) -> list[ShardSplit]:
        """The train split of each of `cfg.domains + cfg.replay`, in that order (the loader's domain index)."""
        return [self.splits[d.name]["train"] for d in self.cfg.domains + self.cfg.replay]

    def val_splits(self) -> list[tuple[DomainConfig, ShardSplit | None]]:
        """(domain, its val split or None when empty) of every domain, in validation order."""
        return [(d, self.splits[d.name].get("val")) for d in all_domains(self.cfg)]

    def tokenizer_path(self) -> Path:
        """The tokenizer the first domain was prepared with, as a path on this machine."""
        return prepared_tokenizer(self.cfg.domains[0].path, self.manifest, self.cache)


def read_manifest(d: DomainConfig, cache: NodeCache | None = None) -> dict:
    """A domain's manifest.json; for a URL domain it is read from the store (`cache` gives a
    scratch folder), which also checks the URL, the bucket and the credentials."""
    where = join(d.path, "manifest.json")
    data = read_bytes(where, (cache or NodeCache.open(DEFAULT_DIR, 0)).root if is_url(d.path) else None)
    if data is None:
        # A store answers "not found" alike for a missing object and a missing bucket.
        place = f" (or no bucket '{d.path.split('/')[2]}')" if is_url(d.path) else ""
        raise UserError(f"{where}: missing{place} (domain '{d.name}'); run `cptrain data prepare --out {d.path}` "
                        "or fix data path")
    return json.loads(data)


def prepared_tokenizer(path: str, manifest: dict, cache: NodeCache | None) -> Path:
    """The tokenizer file or folder of the prepared directory `path`; fetched once per node into
    the cache when `path` is a URL."""
    name = manifest["tokenizer"]["file"]
    if not is_url(path):
        return Path(path) / name
    from .remote import download, is_missing
    cache = cache or NodeCache.open(DEFAULT_DIR, 0)
    folder = cache.folder(path, manifest["tokenizer"]["sha256"].encode())
    # The manifest lists the tokenizer's files; without that list, an HF folder's usual names.
    required = manifest.get("tokenizer_files") or [name if name == "tokenizer.model" else f"{name}/tokenizer.json"]
    optional = [] if "tokenizer_files" in manifest else [f"{name}/{f}" for f in HF_TOKENIZER_FILES]
    for f in dict.fromkeys(required + optional):
        try:
            cache.fetch(folder / f, lambda tmp, f=f: download(join(path, f), tmp))
        except UserError as e:
            if f in required or not is_missing(e):
                raise
    return folder / name


def all_domains(cfg: DataConfig) -> list[DomainConfig]:
    """Training domains, then replay, then validation-only ones (deduplicated by name)."""
    seen, out = set(), []
    for d in [*cfg.domains, *cfg.replay, *cfg.val_domains]:
        if d.name not in seen:
            seen.add(d.name)
            out.append(d)
    return out


def check_mixture(cfg: DataConfig) -> None:
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


def _check_manifest(cfg: DataConfig, d: DomainConfig, m: dict, vocab_size: int) -> None:
    where = join(d.path, "manifest.json")
    if m.get("seq_len") != cfg.seq_len:
        raise UserError(f"{where}: prepared with seq_len {m.get('seq_len')} but data.seq_len is "
                        f"{cfg.seq_len}; set data.seq_len={m.get('seq_len')} or re-run prepare")
    if m["tokenizer"]["vocab_size"] > vocab_size:
        raise UserError(f"{where}: tokenizer vocabulary {m['tokenizer']['vocab_size']} exceeds the "
                        f"model's vocab_size {vocab_size}; raise model vocab_size or use the model's tokenizer")


def validate_data(cfg: DataConfig, vocab_size: int) -> PreparedData:
    """Check the mixture and every domain's prepared directory against the config (manifests,
    shard files and sizes, one tokenizer, training samples present), opening each split once."""
    check_mixture(cfg)
    for d in all_domains(cfg):  # a URL we cannot serve is refused here, never read as a local path
        if is_url(d.path):
            check_url(d.path)
    remote = any(is_url(d.path) for d in all_domains(cfg))
    cache = NodeCache.open(cfg.cache_dir, cfg.cache_limit_gb) if remote else None
    manifests, splits = [], {}
    for d in all_domains(cfg):
        m = read_manifest(d, cache)
        _check_manifest(cfg, d, m, vocab_size)
        splits[d.name] = {}
        for split in ("train", "val"):
            if m["splits"][split]["samples"]:
                splits[d.name][split] = ShardSplit(join(d.path, split), verify=cfg.verify_shards, cache=cache)
                splits[d.name][split].check_files()
        manifests.append(m)
    ids = {m["tokenizer"]["sha256"] for m in manifests}
    if len(ids) > 1:
        raise UserError(f"data: domains were prepared with different tokenizers ({len(ids)} kinds); "
                        "prepare every domain with the same --tokenizer")
    for d in cfg.domains + cfg.replay:
        if "train" not in splits[d.name]:
            raise UserError(f"{join(d.path, 'train')}: no training samples; prepare more text or a smaller --seq-len")
    return PreparedData(cfg, manifests[0], splits, cache)
