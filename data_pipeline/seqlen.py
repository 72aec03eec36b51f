"""The sequence-length schedule (`data.seq_len_schedule`): train at 8K, then 32K, then 64K from one
directory prepared at the longest length, by cutting each row into equal pieces.

A row of S+1 tokens becomes k = S / n pieces of n+1 tokens, piece j = tokens[j*n : (j+1)*n + 1]:
consecutive pieces share one token, as consecutive rows do, so every target of the row is still
trained once. Document ids are cut alike and renumbered from 0 in each piece, so document masking
and RoPE positions restart at every piece start (the model sees each piece as a row of its own).
A micro-batch of B rows becomes one of k*B pieces: the same tokens, so the same accumulation, loss
normalization, learning-rate schedule and token budget.

The length of a step depends only on the tokens trained before it, and the loader reads the same
rows whatever the length (its state does not know about the cut), so a run resumes exactly inside a
phase and across a change of length.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .config import DataConfig


def seq_len_at(cfg: DataConfig, tokens: int) -> int:
    """The row length of a step that starts after `tokens` trained tokens: the first schedule entry
    whose until_tokens lies above, else data.seq_len."""
    for phase in cfg.seq_len_schedule:
        if tokens < phase.until_tokens:
            return phase.seq_len
    return cfg.seq_len


def schedule_lengths(cfg: DataConfig) -> list[tuple[str, int]]:
    """(config key, row length) of every length a run trains at, the full one last."""
    keys = [f"data.seq_len_schedule[{i}].seq_len" for i in range(len(cfg.seq_len_schedule))]
    return list(zip(keys, [p.seq_len for p in cfg.seq_len_schedule])) + [("data.seq_len", cfg.seq_len)]


def check_schedule(cfg: DataConfig, src: str) -> None:
    """Each length divides the prepared one (data.seq_len) and the phases follow each other."""
    for i, phase in enumerate(cfg.seq_len_schedule):
        key = f"data.seq_len_schedule[{i}]"
        if phase.seq_len < 1 or cfg.seq_len % phase.seq_len:
            divisors = ", ".join(str(cfg.seq_len >> s) for s in (1, 2, 3) if (cfg.seq_len >> s) << s == cfg.seq_len)
            raise UserError(f"{src}: {key}.seq_len={phase.seq_len} does not divide data.seq_len={cfg.seq_len}, the "
                            f"length the rows were prepared at; pick a divisor (e.g. {divisors or 1})")
        if phase.until_tokens <= (cfg.seq_len_schedule[i - 1].until_tokens if i else 0):
            raise UserError(f"{src}: {key}.until_tokens={phase.until_tokens} must be positive and above the previous "
                            "entry's; list the phases in training order")


def cut_rows(batch: dict[str, torch.Tensor], seq_len: int) -> dict[str, torch.Tensor]:
    """A loader batch (tokens and doc_ids [B, S+1], per-row entries [B]) as k = S / seq_len times as many
    rows of seq_len+1 tokens, each row's pieces in order; the batch itself when k = 1."""
    tokens = batch["tokens"]
    k = (tokens.shape[1] - 1) // seq_len
    if k == 1:
        return batch
    doc_ids = _pieces(batch["doc_ids"], seq_len)
    rows = {key: v.repeat_interleave(k, dim=0) for key, v in batch.items() if key not in ("tokens", "doc_ids")}
    return {**rows, "tokens": _pieces(tokens, seq_len), "doc_ids": doc_ids - doc_ids[:, :1]}


def _pieces(t: torch.Tensor, n: int) -> torch.Tensor:
    """[B, S+1] -> [B * S/n, n+1]: windows of n+1 every n positions (unfold: [B, S/n, n+1]), row by row."""
    return t.unfold(1, n + 1, n).reshape(-1, n + 1)
