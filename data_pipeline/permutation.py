"""A keyed bijection on [0, n): one domain's sample order in one epoch, computed per index in
constant memory (no array of n entries), so an epoch of 10^9 samples costs what one of 10 does.

A balanced Feistel network (Luby & Rackoff 1988) permutes [0, 4^h) for the smallest h with
4^h >= n; cycle walking (Black & Rogaway 2002) maps an index that lands at or above n through the
network again until it lands below n. Restricted to [0, n) that is again a bijection, and since
4^h < 4n, an index walks fewer than four times on average. Each round XORs one half with a
splitmix64 hash (Steele et al. 2014) of the other half and a round key; the round keys come from
numpy's SeedSequence of the caller's key, e.g. (seed, domain, epoch).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Luby-Rackoff: 4 rounds already make a strong pseudorandom permutation from pseudorandom round
# functions; 6 leave a margin for a hash that is only statistically strong.
ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _hash(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (array arithmetic wraps modulo 2^64 silently)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """`Permutation(n, key)(k)` is the k-th element of a fixed pseudorandom order of [0, n)."""

    def __init__(self, n: int, key: Sequence[int]):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)  # bits per half: 4^half >= n
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.SeedSequence(list(key)).generate_state(ROUNDS, np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = x >> shift, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_hash(right ^ k) & self.mask)
        return (left << shift) | right

    def __call__(self, k: np.ndarray | list[int]) -> np.ndarray:
        """Positions k (each in [0, n)) -> the indices at those positions: a 1-d int64 array."""
        k = np.atleast_1d(np.asarray(k, dtype=np.int64))
        if k.size and (k.min() < 0 or k.max() >= self.n):
            raise IndexError(f"positions must be in [0, {self.n})")
        out = self._feistel(k.astype(np.uint64))
        outside = np.flatnonzero(out >= np.uint64(self.n))
        while outside.size:  # cycle walking: only the indices that left [0, n) go round again
            out[outside] = self._feistel(out[outside])
            outside = outside[out[outside] >= np.uint64(self.n)]
        return out.astype(np.int64)
