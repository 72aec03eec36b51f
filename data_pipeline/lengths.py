"""How long the documents of a prepared split are, as the manifest records it: power-of-two
histograms of document lengths and of each row's longest document piece.

Long-context training only exercises a window of L tokens where a row holds one document over L
positions (document masking restarts attention and RoPE positions at every document start), so
these two counts say what a directory can teach: how many documents span 8K, 32K, ... tokens, and
how many rows hold such a span.

A histogram is {lower bound: count} over buckets [2^b, 2^(b+1)), keys as strings (JSON), only
non-empty buckets, in increasing order: {"8192": 3} counts three lengths in 8192..16383.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def histogram(lengths: Iterable[int]) -> dict[str, int]:
    """Power-of-two histogram of positive lengths."""
    n = np.fromiter(lengths, dtype=np.int64)
    if not n.size:
        return {}
    # frexp: n = m * 2^e with m in [0.5, 1), so 2^(e-1) <= n < 2^e, exactly for n < 2^53.
    bounds, counts = np.unique(np.left_shift(1, np.frexp(n.astype(np.float64))[1] - 1), return_counts=True)
    return {str(int(b)): int(c) for b, c in zip(bounds, counts)}


def add(histograms: Iterable[dict[str, int]]) -> dict[str, int]:
    """The bucket-wise sum of histograms (chunks of a split, parts of a preparation)."""
    total: dict[int, int] = {}
    for h in histograms:
        for bound, count in h.items():
            total[int(bound)] = total.get(int(bound), 0) + count
    return {str(b): total[b] for b in sorted(total)}


def longest_piece(doc_starts: np.ndarray, seq_len: int) -> int:
    """The most input positions (of a row's seq_len) one document covers: the longest context any
    target of the row is predicted from. `doc_starts`: the row's sorted document offsets, 0 first."""
    starts = doc_starts[doc_starts < seq_len]
    return int(np.diff(np.append(starts, seq_len)).max())


def describe(h: dict[str, int]) -> str:
    """'512-1K: 3, 8K-16K: 1' for the report (buckets [lo, 2 lo))."""
    return ", ".join(f"{_short(int(b))}-{_short(2 * int(b))}: {c:,}" for b, c in h.items()) or "none"


def _short(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
