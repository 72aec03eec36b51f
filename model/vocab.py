"""A model's embedding and output head grown for an extended vocabulary (data_pipeline/vocab.py).

New rows start as the mean of the base rows of the pieces the base tokenizer splits the new
token into (Fast Vocabulary Transfer, Gee et al. 2022): the model reads a new token roughly as it
read its pieces, and predicts it where it predicted their start. Old rows are copied unchanged,
so the logits over the old vocabulary do not move. The row count is padded to a multiple (64 by
default: tensor-core friendly matmul shapes); padding rows, which no tokenizer id reaches, start
as the mean of all base rows.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import UserError
from .config import ModelConfig


def extend_embeddings(cfg: ModelConfig, state: dict[str, torch.Tensor], first_id: int, parts: list[list[int]],
                      init: str = "mean", pad_multiple: int = 64, seed: int = 0) -> tuple[ModelConfig, dict]:
    """(config, state dict) with rows [first_id, first_id + len(parts)) for the new tokens. Rows at
    and above first_id that the base model already had (its own padding) are taken over."""
    if init not in ("mean", "random"):
        raise UserError(f"--init {init!r} is unknown; use mean (of the new token's pieces) or random")
    if pad_multiple < 1:
        raise UserError(f"--pad-multiple {pad_multiple} must be at least 1")
    if first_id > cfg.vocab_size:
        raise UserError(f"the tokenizer's {first_id} tokens exceed the model's {cfg.vocab_size} embedding rows; "
                        "extend the model's own tokenizer")
    rows = max(cfg.vocab_size, math.ceil((first_id + len(parts)) / pad_multiple) * pad_multiple)
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    names = ["tok_embeddings.weight"] + ([] if cfg.tie_embeddings else ["output.weight"])
    for name in names:
        old = state[name]
        base = old[:first_id].float()
        grown = base.mean(0).expand(rows, -1).clone()  # padding rows: the mean of the base rows
        grown[:first_id] = base
        if init == "mean":
            grown[first_id:first_id + len(parts)] = torch.stack([base[ids].mean(0) for ids in parts]) if parts else grown[:0]
        else:  # at the scale of the base rows, as a fresh init of the layer would be
            grown[first_id:first_id + len(parts)] = torch.randn(len(parts), base.shape[1], generator=gen) * base.std()
        out[name] = grown.to(old.dtype)
    return dataclasses.replace(cfg, vocab_size=rows), out
