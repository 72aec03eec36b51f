"""What is backpropagated: next-token cross-entropy, normalized by the global count of target tokens.

Every engine averages gradients over data-parallel ranks, so a rank's loss is scaled by
world_size / global_targets: the update is then the gradient of (sum of token losses / global
target count), the same whatever the gradient accumulation or world size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_ce(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.head(hidden).float(), targets, reduction="none")


def token_losses(model, batch: dict, chunk_tokens: int = 0) -> torch.Tensor:
    """Per-token cross-entropy [B, S] of predicting tokens[:, 1:] from tokens[:, :-1].

    With chunk_tokens > 0 the output head and the loss run over chunks of tokens whose logits are
    recomputed in backward, so the [B*S, vocab] logits never exist at once.
    """
    tokens, doc_ids = batch["tokens"], batch.get("doc_ids")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    doc_ids = doc_ids[:, :-1] if doc_ids is not None else None
    if chunk_tokens <= 0:
        logits = model(inputs, doc_ids)  # [B, S, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
    hidden = model.hidden(inputs, doc_ids).flatten(0, 1)  # [B*S, D]
    flat_targets = targets.flatten()
    pieces = [
        checkpoint(_chunk_ce, model, h, t, use_reentrant=False)
        for h, t in zip(hidden.split(chunk_tokens), flat_targets.split(chunk_tokens))
    ]
    return torch.cat(pieces).view_as(targets)


def lm_loss(model, batch: dict, scale: float, chunk_tokens: int = 0) -> tuple[torch.Tensor, dict]:
    """Returns (the scalar to backpropagate, detached stats): stats['loss_sum'] is the plain sum of
    token losses, stats['sample_loss'] the mean loss of each sample (for per-domain logging)."""
    losses = token_losses(model, batch, chunk_tokens)  # [B, S]
    total = losses.sum()
    return total * scale, {"loss_sum": total.detach(), "sample_loss": losses.detach().mean(dim=1)}
