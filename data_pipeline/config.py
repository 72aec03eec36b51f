"""The data section of a run (DataConfig and its parts) and its one check against the prepared
directories: `validate_data` returns a PreparedData, which the loaders take as is."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .shards import ShardSplit


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


@dataclass
class PreparedData:
    """A checked DataConfig with what checking it opened; built once per run by validate_data."""
    cfg: DataConfig
    manifest: dict                              # the first domain's manifest.json
    splits: dict[str, dict[str, ShardSplit]]    # domain name -> {"train"/"val": split}, non-empty splits only

    def train_splits(self) -> list[ShardSplit]:
        """The train split of each of `cfg.domains + cfg.replay`, in that order (the loader's domain index)."""
        return [self.splits[d.name]["train"] for d in self.cfg.domains + self.cfg.replay]

    def val_splits(self) -> list[tuple[DomainConfig, ShardSplit | None]]:
        """(domain, its val split or None when empty) of every domain, in validation order."""
        return [(d, self.splits[d.name].get("val")) for d in all_domains(self.cfg)]


def read_manifest(d: DomainConfig) -> dict:
    path = Path(d.path) / "manifest.json"
    if not path.exists():
        raise UserError(f"{path}: missing (domain '{d.name}'); run `cptrain data prepare --out {d.path}` "
                        "or fix data path")
    return json.loads(path.read_text())


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
    where = Path(d.path) / "manifest.json"
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
    manifests, splits = [], {}
    for d in all_domains(cfg):
        m = read_manifest(d)
        _check_manifest(cfg, d, m, vocab_size)
        splits[d.name] = {}
        for split in ("train", "val"):
            if m["splits"][split]["samples"]:
                splits[d.name][split] = ShardSplit(Path(d.path) / split, verify=cfg.verify_shards)
                splits[d.name][split].check_files()
        manifests.append(m)
    ids = {m["tokenizer"]["sha256"] for m in manifests}
    if len(ids) > 1:
        raise UserError(f"data: domains were prepared with different tokenizers ({len(ids)} kinds); "
                        "prepare every domain with the same --tokenizer")
    for d in cfg.domains + cfg.replay:
        if "train" not in splits[d.name]:
            raise UserError(f"{Path(d.path) / 'train'}: no training samples; prepare more text or a smaller --seq-len")
    return PreparedData(cfg, manifests[0], splits)
