"""The training mixture: which domain global sample g comes from and which of its samples it is.

  * Global sample g (g = 0, 1, 2, ...) belongs to the domain drawn from a counter-based hash of
    (seed, g) under the weights in effect at g (base weights, a phase, or an online override).
  * Each domain d keeps a cursor c_d: the number of its samples drawn so far. Its c-th sample is
    the sample `order(seed, d, epoch)[c % N_d]` of its train split (epoch = c // N_d), so epochs wrap
    and every sample appears once per epoch. The order is a keyed bijection computed per position
    (permutation.py, state version 2); states saved at version 1 keep the numpy permutation array
    they were made with.
  * The state (position + cursors) says nothing about ranks or world size (docs/data.md).
"""
from __future__ import annotations

import warnings
import zlib

import numpy as np

from ..errors import UserError
from .config import DataConfig
from .permutation import Permutation

STATE_VERSION = 2  # 2: Feistel order (permutation.py); 1: rng.permutation(N) per domain and epoch


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
        for name, n in state.get("num_samples", {}).items():
            if name in self.names and n != sizes[self.names.index(name)]:
                warnings.warn(f"data: domain '{name}' had {n} training samples when this state was saved and "
                              f"has {sizes[self.names.index(name)]} now (re-prepared?); its order from here "
                              "on differs from the original run")
        self.version = int(state.get("version", STATE_VERSION))
        if self.version not in (1, STATE_VERSION):
            raise UserError(f"data: the checkpoint's loader state has version {self.version}, this cptrain reads "
                            f"1 and {STATE_VERSION}; resume with the cptrain that saved it")
        self._orders: dict[str, tuple[int, Permutation | np.ndarray]] = {}  # domain -> (epoch, its order)
        self.rewind(state)

    def rewind(self, state: dict) -> None:
        """Move to a saved position: cursors and weight override with it (seed and sizes stay)."""
        self.position = int(state.get("position", 0))
        # Domains absent from the state (added at resume) start at 0; dropped ones are forgotten.
        self.cursors = {n: int(state.get("cursors", {}).get(n, 0)) for n in self.names}
        self.override = state.get("weights_override")

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

    def _order(self, name: str, n: int, epoch: int) -> Permutation | np.ndarray:
        """Position -> sample index of one domain in one epoch (callable or indexable by an array)."""
        cached = self._orders.get(name)
        if cached is None or cached[0] != epoch:
            key = [self.seed, zlib.crc32(name.encode()), epoch]
            # Version 1 kept an O(N) array per domain; version 2 computes each position on demand.
            order = np.random.default_rng(key).permutation(n) if self.version == 1 else Permutation(n, key)
            cached = self._orders[name] = (epoch, order)
        return cached[1]

    def sample_indices(self, d: int, cursors: np.ndarray) -> np.ndarray:
        """The sample index in domain d's train split of its draws number `cursors`."""
        name, n = self.names[d], self.sizes[d]
        epochs, k = np.divmod(cursors, n)
        if not self.cfg.shuffle:
            return k
        out = np.empty_like(k)
        for epoch in np.unique(epochs):  # one or two epochs, unless a batch outnumbers the domain
            sel = epochs == epoch
            order = self._order(name, n, int(epoch))
            out[sel] = order(k[sel]) if isinstance(order, Permutation) else order[k[sel]]
        return out

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next n global samples as (domain, sample index); advances the state."""
        domains = self.domains_of(self.position, n)
        samples = np.empty(n, dtype=np.int64)
        for d in np.unique(domains):
            sel = np.flatnonzero(domains == d)
            start = self.cursors[self.names[d]]  # a domain's draws take its next cursors, in order
            samples[sel] = self.sample_indices(int(d), np.arange(start, start + len(sel), dtype=np.int64))
            self.cursors[self.names[d]] += len(sel)
        self.position += n
        return list(zip(domains.tolist(), samples.tolist()))

    def state_dict(self) -> dict:
        return {"version": self.version, "seed": self.seed, "position": self.position,
                "cursors": dict(self.cursors), "weights_override": self.override,
                "num_samples": dict(zip(self.names, self.sizes))}
