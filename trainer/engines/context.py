"""Context parallelism: each sequence split over the `parallel.cp` ranks of a context group, with
attention over the whole row done by one of two algorithms.

- Ulysses (Jacobs et al. 2023, "DeepSpeed Ulysses"): rank r holds the r-th contiguous piece of every
  row. Before attention an all-to-all trades the sequence split for a split of the heads (each rank
  then holds the whole row for heads / cp of the heads), any local backend attends with the row's own
  document mask or varlen layout, and a second all-to-all trades back. The degree is bounded by the
  key/value heads, which are split too.
- Ring (Liu et al. 2023, "Ring Attention with Blockwise Transformers"): keys and values travel around
  the ring of ranks; each rank attends its queries to the block it holds and merges the partial
  results by their log-sum-exp, so no rank ever holds the whole row. Under a causal mask the work is
  balanced by giving rank r the chunks r and 2 cp - 1 - r of 2 cp equal chunks (Llama 3's and
  torchtitan's layout). The backward passes the key/value gradients around the ring with their blocks.
  The blocks are computed by plain tensor arithmetic (masked scores, float32 softmax), the reference
  the tests hold every layout to; its memory grows with the square of the local length.

The model never sees a collective: the trainer shards each batch (`ContextParallel.shard`) and hands
the model a `SequenceSplit`, which knows where this rank's tokens sit in the rows (RoPE positions,
document masks) and builds each layer kind's attention context around one of the functions below.
Documents, sliding windows, score soft-capping and custom scales are applied over whole rows, so a
split run computes what one process computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from ...errors import UserError
from ...model.attention import AttentionContext, attend, build_context, doc_positions, doc_segments
from .layout import Layout


def check(layout_cp: int, method: str, arch, seq_len: int, src: str, key: str = "data.seq_len") -> None:
    """What context parallelism needs of the model and of the row length `key` (at config load, one line each)."""
    if layout_cp == 1:
        return
    pieces = layout_cp if method == "ulysses" else 2 * layout_cp
    if seq_len % pieces:
        raise UserError(f"{src}: {key}={seq_len} does not split into {pieces} equal pieces "
                        f"(parallel.cp={layout_cp}, cp_method={method}); pick a seq_len divisible by {pieces}")
    if method == "ulysses" and (arch.n_kv_heads % layout_cp or arch.n_heads % layout_cp):
        raise UserError(f"{src}: parallel.cp_method=ulysses splits the attention heads over the {layout_cp} ranks, and "
                        f"the model has {arch.n_heads} query / {arch.n_kv_heads} key-value heads; use a cp dividing both "
                        "or parallel.cp_method=ring")


class ContextParallel:
    """Shards batches over this rank's context group and builds the splits the model attends through."""

    def __init__(self, layout: Layout, doc_masking: bool):
        self.layout, self.doc_masking = layout, doc_masking
        self.cp, self.rank, self.method = layout.cp, layout.cp_rank, layout.cp_method
        self.group = layout.group("cp")
        self.ranks = dist.get_process_group_ranks(self.group)  # global ranks, in cp-rank order

    def index(self, cp_rank: int, row_len: int, device) -> torch.Tensor:
        """The positions of a row that `cp_rank` holds: a contiguous piece (Ulysses), or chunks r and
        2 cp - 1 - r of 2 cp (ring)."""
        if self.method == "ulysses":
            piece = row_len // self.cp
            return torch.arange(cp_rank * piece, (cp_rank + 1) * piece, device=device)
        chunk = row_len // (2 * self.cp)
        ends = (cp_rank, 2 * self.cp - 1 - cp_rank)
        return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in ends])

    def shard(self, batch: dict) -> dict:
        """This rank's part of a batch of whole rows (tokens [B, S + 1]): its inputs and targets, and the
        split the model attends through; every other entry (domain, sample ids, weights) unchanged."""
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        doc_ids = batch["doc_ids"][:, :-1] if self.doc_masking and batch.get("doc_ids") is not None else None
        index = self.index(self.rank, inputs.shape[1], inputs.device)
        split = SequenceSplit(self, doc_ids, index, inputs.shape[0], inputs.shape[1])
        rest = {k: v for k, v in batch.items() if k not in ("tokens", "doc_ids")}
        return {**rest, "inputs": inputs[:, index], "targets": targets[:, index], "split": split}


@dataclass
class SequenceSplit:
    """Where this rank's tokens sit in their rows, for the model (model/decoder.py attention_context)."""
    cp: ContextParallel
    doc_ids: torch.Tensor | None  # [B, S] documents of the whole rows (None: plain causal)
    index: torch.Tensor  # [S / cp] the positions this rank holds
    batch: int
    row_len: int  # S

    @property
    def positions(self) -> torch.Tensor:
        """RoPE positions of this rank's tokens [B or 1, S / cp]: their place in their documents."""
        if self.doc_ids is None:
            return self.index[None]
        return doc_positions(self.doc_ids)[:, self.index]

    def context(self, backend: str, cos: torch.Tensor, sin: torch.Tensor, scale: float | None = None,
                softcap: float | None = None, window: int | None = None) -> AttentionContext:
        if self.cp.method == "ulysses":
            whole = build_context(backend, self.doc_ids, cos, sin, self.batch, self.row_len, cos.device, scale=scale,
                                  softcap=softcap, window=window)
            run = partial(_ulysses, self.cp.group, whole)
        else:
            segments = doc_segments(self.doc_ids)[1] if self.doc_ids is not None else None
            run = partial(_RingAttention.apply, self, segments, scale, softcap, window)
        # A graph break under torch.compile: the collectives run eagerly, the rest of the block compiles.
        return AttentionContext(cos, sin, backend, None, scale, softcap, window, distributed=torch.compiler.disable(run))


# ---------------------------------------------------------------- Ulysses

def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[B, S/cp, H, hd] (a piece of the row, every head) -> [B, S, H/cp, hd] (the whole row, a share of heads)."""
    cp = dist.get_world_size(group)
    b, s, h, d = x.shape
    send = x.reshape(b, s, cp, h // cp, d).permute(2, 0, 1, 3, 4).contiguous()  # [cp (head share), B, S/cp, H/cp, hd]
    recv = _all_to_all(send, group)  # [cp (row piece), B, S/cp, H/cp, hd]
    return recv.permute(1, 0, 2, 3, 4).reshape(b, cp * s, h // cp, d)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse of _seq_to_heads: [B, S, H/cp, hd] -> [B, S/cp, H, hd]."""
    cp = dist.get_world_size(group)
    b, s, h, d = x.shape
    send = x.reshape(b, cp, s // cp, h, d).permute(1, 0, 2, 3, 4).contiguous()  # [cp (row piece), B, S/cp, H/cp, hd]
    recv = _all_to_all(send, group)  # [cp (head share), B, S/cp, H/cp, hd]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // cp, cp * h, d)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-to-all over dim 0 (torch's functional collective; its backward is the reverse exchange)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x, None, None, group))


def _ulysses(group, whole: AttentionContext, q, k, v) -> torch.Tensor:
    """q [B, S/cp, H, hd], k/v [B, S/cp, KV, hd] -> [B, S/cp, H, hd]: attention over the whole row for a
    share of the heads. Contiguous head shares keep each query head with its key/value head (grouped
    query attention: head h reads key/value head h // (H / KV), and both splits cut at multiples of it)."""
    out = attend(_seq_to_heads(q, group), _seq_to_heads(k, group), _seq_to_heads(v, group), whole)
    return _heads_to_seq(out, group)


# ---------------------------------------------------------------- ring

def _allowed(segments, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None):
    """Bool [B or 1, 1, Sq, Sk]: query at row position i may attend key j (causal, same document, window)."""
    ok = k_pos[None, :] <= q_pos[:, None]
    if window:
        ok = ok & (q_pos[:, None] - k_pos[None, :] < window)
    ok = ok[None]
    if segments is not None:
        ok = ok & (segments[:, q_pos, None] == segments[:, None, k_pos])
    return ok[:, None]


def _scores(q, k, scale, softcap):
    """Float32 scores [B, H, Sq, Sk] (k already repeated to H heads), and tanh of the capped ones."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if softcap:
        t = torch.tanh(s / softcap)
        return t * softcap, t
    return s, None


def _block_forward(q, k, v, mask, scale, softcap):
    """(out [B, Sq, H, hd] float32, lse [B, H, Sq]) of one key/value block; rows with no allowed key: 0, -inf."""
    s, _ = _scores(q, k, scale, softcap)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None].clamp(min=torch.finfo(torch.float32).min)).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.float()), lse


def _block_backward(dout, q, k, v, out, lse, mask, scale, softcap):
    """dq, dk, dv of one block, from the merged output and log-sum-exp (their softmax is the whole row's,
    so each block's share of the gradient needs nothing of the others: FlashAttention's backward)."""
    s, t = _scores(q, k, scale, softcap)
    p = torch.exp(s - lse[..., None]).masked_fill(~mask, 0.0).nan_to_num(0.0)  # [B, H, Sq, Sk]
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, v.float())
    ds = p * (dp - (dout * out).sum(-1).transpose(1, 2)[..., None])
    if softcap:
        ds = ds * (1 - t * t)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.float()) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float()) * scale
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dout)
    return dq, dk, dv


def _pass_on(tensors: list[torch.Tensor], ranks: list[int], me: int) -> list[torch.Tensor]:
    """Send `tensors` to the next rank of the ring and receive the previous rank's."""
    n = len(ranks)
    to, frm = (me + 1) % n, (me - 1) % n
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), ranks[to]) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, ranks[frm]) for r in received]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


class _RingAttention(torch.autograd.Function):
    """Ring attention over the context group; q [B, S/cp, H, hd], k/v [B, S/cp, KV, hd] -> [B, S/cp, H, hd]."""

    @staticmethod
    def forward(ctx, split: SequenceSplit, segments, scale, softcap, window, q, k, v):
        cp, me = split.cp.cp, split.cp.rank
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        rep = q.shape[2] // k.shape[2]
        q_pos = split.index
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
        kv = [k, v]
        for step in range(cp):
            k_pos = split.cp.index((me - step) % cp, split.row_len, q.device)
            mask = _allowed(segments, q_pos, k_pos, window)
            if bool(mask.any()):
                k_s, v_s = (t.repeat_interleave(rep, dim=2) for t in kv)
                o_s, lse_s = _block_forward(q, k_s, v_s, mask, scale, softcap)
                new = torch.logaddexp(lse, lse_s)
                keep = torch.exp(lse - new).nan_to_num(0.0).transpose(1, 2)[..., None]
                take = torch.exp(lse_s - new).nan_to_num(0.0).transpose(1, 2)[..., None]
                out, lse = out * keep + o_s * take, new
            if step < cp - 1:
                kv = _pass_on(kv, split.cp.ranks, me)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.split, ctx.segments, ctx.scale, ctx.softcap, ctx.window = split, segments, scale, softcap, window
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        split = ctx.split
        cp, me, rep = split.cp.cp, split.cp.rank, q.shape[2] // k.shape[2]
        dout = dout.float()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = [k, v]
        dkv = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in kv]  # travels with its block
        for step in range(cp):
            k_pos = split.cp.index((me - step) % cp, split.row_len, q.device)
            mask = _allowed(ctx.segments, split.index, k_pos, ctx.window)
            if bool(mask.any()):
                k_s, v_s = (t.repeat_interleave(rep, dim=2) for t in kv)
                dq_s, dk_s, dv_s = _block_backward(dout, q, k_s, v_s, out, lse, mask, ctx.scale, ctx.softcap)
                dq += dq_s
                for acc, d in zip(dkv, (dk_s, dv_s)):  # the query heads' shares back onto their key/value head
                    acc += d.unflatten(2, (acc.shape[2], rep)).sum(3)
            if step < cp - 1:
                kv, dkv = (lambda moved: (moved[:2], moved[2:]))(_pass_on(kv + dkv, split.cp.ranks, me))
        dk, dv = _pass_on(dkv, split.cp.ranks, me)  # each block's gradient home, one step further on
        return None, None, None, None, None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
