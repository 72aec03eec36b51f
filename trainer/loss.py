"""What is backpropagated: next-token cross-entropy, normalized by the global count of target tokens,
plus a mixture of experts' router losses (router_terms; trainer/moe.py logs them).

Every engine averages gradients over data-parallel ranks, so a rank's loss is scaled by
world_size / global_targets: the update is then the gradient of (sum of token losses / global
target count), the same whatever the gradient accumulation or world size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.decoder import softcap
from ..model.moe import compute_dtype, router_losses


def _ce_and_dlogits(logits: torch.Tensor, t: torch.Tensor, cap: float | None,
                    row_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [n] (float32) and d loss / d logits [n, V] (in the logits' dtype) of one chunk's
    logits [n, V], each row's gradient scaled by row_weight [n] when given. With a final soft-cap the
    logits are cap * tanh(z / cap) and the gradient is taken through it.

    Written so that, compiled, it is one pass over the chunk that reads the logits in the compute dtype
    and upcasts them in registers: the max and the sum of exponentials as the online-softmax pattern,
    and the one-hot as a comparison. (torch.logsumexp's inf guard and a scatter_add each made the
    compiler write a float32 copy of the whole chunk, then cast the gradient in a second kernel.)"""
    z = logits.float()
    if cap is not None:
        capped = torch.tanh(z / cap)
        z = capped * cap
    top = z.amax(dim=-1, keepdim=True)
    lse = (z - top).exp().sum(dim=-1, keepdim=True).log() + top  # [n, 1]
    loss = (lse - z.gather(1, t[:, None])).squeeze(1)
    hit = torch.arange(z.shape[1], device=z.device) == t[:, None]
    dlogits = (z - lse).exp() - hit.to(z.dtype)  # softmax - onehot
    if cap is not None:
        dlogits = dlogits * (1 - capped * capped)  # d(cap * tanh(z / cap)) / dz
    if row_weight is not None:
        dlogits = dlogits * row_weight[:, None]
    return loss, dlogits.to(logits.dtype)


_compiled_chunk = None


def _chunk_fn(device: torch.device):
    # Compiled, the softmax and its gradient are one pass over the chunk's logits instead of ~5.
    global _compiled_chunk
    if device.type != "cuda":
        return _ce_and_dlogits
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_ce_and_dlogits, dynamic=False)
    return _compiled_chunk


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight^T, targets_i) with the output head fused in, chunk by chunk.

    The gradients are computed in the forward pass, chunk by chunk (as Liger-Kernel's fused
    linear cross-entropy does, Hsu et al. 2024), so neither the [N, V] logits nor their gradient
    ever exist whole, and nothing is recomputed: the head costs the same 6*V*D FLOPs per token as
    the unfused path. The output is a scalar sum, so backward only scales the stored gradients.
    With row_weight [N] the sum (and each row's gradient) is weighted (trainer/reweighting.py).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, dtype, row_weight=None, cap=None):
        # hidden [N, D], weight [V, D], targets [N]
        h_all, w = hidden.to(dtype), weight.to(dtype)
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(h_all)
        grad_w = None
        fn = _chunk_fn(hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = h_all[rows]
            logits = h @ w.t()
            losses[rows], dlogits = fn(logits, targets[rows], cap, None if row_weight is None else row_weight[rows])
            del logits  # before the next chunk's are made: one chunk's logits alive at a time
            torch.mm(dlogits, w, out=grad_h[rows])
            partial = dlogits.t() @ h
            if grad_w is None:  # the first chunk's product is the accumulator: no zero fill, no add
                grad_w = partial if start + chunk >= hidden.shape[0] else partial.float()  # one chunk: nothing to add up
            else:
                grad_w += partial  # fp32 accumulation of bf16 partial products
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(losses)
        return (losses.sum() if row_weight is None else (losses * row_weight).sum()), losses

    @staticmethod
    def backward(ctx, grad_total, _grad_losses):
        grad_h, grad_w = ctx.saved_tensors
        # In place: the head's [V, D] gradient is the largest tensor here, and a copy of it costs a pass.
        return grad_h.mul_(grad_total).to(ctx.dtypes[0]), grad_w.mul_(grad_total).to(ctx.dtypes[1]), None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                         row_weight: torch.Tensor | None = None, cap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses with gradient, per-token losses [N] detached) for hidden [N, D]; the
    sum is weighted by row_weight [N] when given; `cap` soft-caps the logits (Gemma 2)."""
    dtype = compute_dtype(weight)
    if torch.is_grad_enabled():
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, dtype, row_weight, cap)
    h_all, w = hidden.to(dtype), weight.to(dtype)  # evaluation: losses only, still chunk by chunk
    losses = torch.cat([F.cross_entropy(softcap((h @ w.t()).float(), cap), t, reduction="none")
                        for h, t in zip(h_all.split(chunk_tokens), targets.split(chunk_tokens))])
    return (losses.sum() if row_weight is None else (losses * row_weight).sum()), losses


def router_terms(aux: dict, coefs: tuple[float, float], tokens: int) -> tuple[torch.Tensor, dict]:
    """(what the routers add to the loss of a micro-batch of `tokens` target tokens, before the loss's
    scale, and its sums for Step.sums). Each loss is a mean over the micro-batch, so it is weighted by its
    tokens: with the loss scale world / global tokens the update follows their mean over the step."""
    balance, z = router_losses(aux["router"])
    added = (coefs[0] * balance + coefs[1] * z) * tokens
    sums = {"router": aux["router"].detach(), "router_loss": torch.stack([balance.detach() * tokens, z.detach() * tokens,
                                                                          balance.new_tensor(float(tokens))])}
    return added, sums


def _inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, object]:
    """(inputs [B, S], doc_ids [B, S] or None, targets [B, S], split): tokens[:, :-1] predict tokens[:, 1:].
    A batch sharded for context parallelism (trainer/engines/context.py) holds this rank's inputs and
    targets and the `split` that says where they sit in the rows."""
    if "split" in batch:
        return batch["inputs"], None, batch["targets"], batch["split"]
    tokens, doc_ids = batch["tokens"], batch.get("doc_ids")
    return tokens[:, :-1], (doc_ids[:, :-1] if doc_ids is not None else None), tokens[:, 1:], None


def token_losses(model, batch: dict, chunk_tokens: int = 0, aux: dict | None = None) -> torch.Tensor:
    """Per-token cross-entropy [B, S] of predicting tokens[:, 1:] from tokens[:, :-1]; with
    chunk_tokens > 0 (no gradient through the result: for evaluation) the output head and the
    loss run over chunks of tokens, so the [B*S, vocab] logits never exist at once. `aux`: as
    Decoder.hidden's (a mixture of experts' router statistics)."""
    inputs, doc_ids, targets, split = _inputs(batch)
    if chunk_tokens <= 0:
        logits = model(inputs, doc_ids, split=split, aux=aux)  # [B, S, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
    hidden = model.hidden(inputs, doc_ids, split=split, aux=aux).flatten(0, 1)  # [B*S, D]
    _, losses = linear_cross_entropy(hidden, model.head_weight(), targets.flatten(), chunk_tokens, cap=model.cfg.final_softcap)
    return losses.view_as(targets)


def lm_loss(model, batch: dict, scale: float, chunk_tokens: int = 0,
            router_coefs: tuple[float, float] = (0.0, 0.0)) -> tuple[torch.Tensor, dict]:
    """Returns (the scalar to backpropagate, detached stats): stats['loss_sum'] is the plain sum of
    token losses, stats['sample_loss'] each sample's summed loss over its whole row's target count
    (its mean loss; under context parallelism, this rank's part of it: the parts add up). With
    chunk_tokens > 0 the head and the loss are fused (see _LinearCrossEntropy).
    batch['sample_weight'] [B] (optional, trainer/reweighting.py) scales each sample's losses in
    what is backpropagated; the stats stay plain. A mixture of experts adds its load-balancing and
    z-losses with weights `router_coefs` and reports stats['sums'] (router_terms)."""
    weight = batch.get("sample_weight")
    aux = {} if model.cfg.n_experts else None
    if chunk_tokens <= 0:
        losses = token_losses(model, batch, aux=aux)  # [B, S]
        total = losses.sum()
        backprop = total if weight is None else (losses.sum(dim=1) * weight).sum()
    else:
        inputs, doc_ids, targets, split = _inputs(batch)
        hidden = model.hidden(inputs, doc_ids, split=split, aux=aux).flatten(0, 1)  # [B*S, D]
        row_weight = None if weight is None else weight.repeat_interleave(targets.shape[1])
        backprop, flat = linear_cross_entropy(hidden, model.head_weight(), targets.flatten(), chunk_tokens, row_weight,
                                              model.cfg.final_softcap)
        losses = flat.view_as(targets)
        total = backprop if weight is None else flat.sum()
    losses = losses.detach()
    sample = losses.sum(dim=1) / batch["split"].row_len if "split" in batch else losses.mean(dim=1)
    stats = {"loss_sum": total.detach(), "sample_loss": sample}
    if aux:
        added, stats["sums"] = router_terms(aux, router_coefs, losses.numel())
        backprop = backprop + added
    return backprop * scale, stats
