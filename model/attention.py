"""Attention backends (sdpa, flash_attn, flex, and an explicit-scores path) with document masking,
sliding windows, custom score scales and score soft-capping.

A forward pass builds one `AttentionContext` per layer kind (full or sliding: RoPE cos/sin plus
whatever the backend needs to mask) and hands them to every block, so a block is self-contained for
FSDP, activation checkpointing and torch.compile. A "document" is a maximal run of equal `doc_ids`
in a row: a token attends to earlier tokens of its own document only (within the window, on a
sliding layer), and RoPE positions restart at each run. A backend that cannot do what a layer needs
(soft-capping, a window) hands the layer to one that can, saying so once; never silently wrong.
"""
from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import UserError

try:  # flash-attn has no CPU build; without it flash_attn falls back to sdpa
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None
try:  # torch >= 2.9 ships FlashAttention-2's varlen kernels (CUDA only): document masking without the package
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
    _VARLEN_ARGS = inspect.signature(torch_varlen_attn).parameters  # its keywords changed between releases
except ImportError:
    torch_varlen_attn, _VARLEN_ARGS = None, {}

_warned: set[str] = set()
_fa4 = None  # flash-attn-4's interface module; False: unavailable (see fa4_interface)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


@dataclass
class VarlenInfo:
    """Packed-document layout for varlen flash attention over the flattened [B*S] tokens."""
    cu_seqlens: torch.Tensor  # [n_docs + 1] int32 offsets of document starts, ending at B*S
    max_seqlen: int  # bound on a document's length: the row length (the exact maximum needs a device sync)


@dataclass
class AttentionContext:
    """What every block of one kind needs besides its hidden states; built once per forward."""
    cos: torch.Tensor  # [B, S, head_dim] float32 (B may be 1 when positions are shared)
    sin: torch.Tensor  # [B, S, head_dim] float32
    backend: str  # the backend actually used: "sdpa", "flash_attn", "flex" or "eager"
    # None: plain causal. sdpa/eager: bool [B or 1, 1, S, S] (True = may attend). flash_attn:
    # VarlenInfo. flex: a BlockMask (document-causal and/or windowed, or causal).
    mask: Any = None
    scale: float | None = None  # score scale; None: head_dim ** -0.5
    softcap: float | None = None  # scores soft-capped as c * tanh(s / c)
    window: int | None = None  # keys a query sees, itself included (sliding layers)
    # Context parallelism: this rank holds part of each row, and attention over the whole row is this
    # function of the rank's q, k, v (the trainer supplies it; the model never calls a collective).
    distributed: Callable | None = None


def doc_segments(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, segments) of doc_ids [B, S]: starts [B, S] bool marks a document's first token;
    segments [B, S] int64 numbers the documents of a row 0, 1, 2, ..."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts, starts.long().cumsum(dim=1) - 1


def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions [B, S] int64 that restart at 0 at each document start."""
    starts, _ = doc_segments(doc_ids)
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # [B, S]
    return idx - last_start


def doc_causal_mask(doc_ids: torch.Tensor | None, window: int | None = None, seq_len: int = 0,
                    device: torch.device | None = None) -> torch.Tensor:
    """Dense bool mask [B, 1, S, S] ([1, 1, S, S] without doc_ids): query i may attend key j iff
    i - window < j <= i (no lower bound without a window), in the same document."""
    s = doc_ids.shape[1] if doc_ids is not None else seq_len
    device = doc_ids.device if doc_ids is not None else device
    i = torch.arange(s, device=device)
    allowed = i[None, :] <= i[:, None]  # [S (query), S (key)]
    if window:
        allowed &= i[None, :] > i[:, None] - window
    if doc_ids is None:
        return allowed[None, None]
    _, seg = doc_segments(doc_ids)
    return ((seg[:, :, None] == seg[:, None, :]) & allowed)[:, None]


def _varlen_info(doc_ids: torch.Tensor) -> VarlenInfo:
    starts, _ = doc_segments(doc_ids)
    flat = starts.flatten().nonzero().flatten()  # every row's first token is a start
    total = torch.tensor([starts.numel()], device=doc_ids.device)
    cu = torch.cat([flat, total]).to(torch.int32)
    torch._dynamo.maybe_mark_dynamic(cu, 0)  # the number of documents changes every batch: no recompiles
    return VarlenInfo(cu_seqlens=cu, max_seqlen=doc_ids.shape[1])


def _flex_block_mask(doc_ids: torch.Tensor | None, batch: int, seq_len: int, device: torch.device, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q, kv):
        return (q >= kv) & (q - kv < window) if window else q >= kv
    if doc_ids is None:
        return create_block_mask(causal, None, None, seq_len, seq_len, device=device)
    _, seg = doc_segments(doc_ids)

    def doc_mask_mod(b, h, q, kv):
        return (seg[b, q] == seg[b, kv]) & causal(b, h, q, kv)
    return create_block_mask(doc_mask_mod, batch, None, seq_len, seq_len, device=device)


def fa4_interface(device: torch.device):
    """flash-attn-4's interface module (FlashAttention-4, CuTe DSL kernels for Hopper and Blackwell)
    when it is installed, `device` is such a GPU and CPTRAIN_FA4 is not 0, else None; decided once
    per process."""
    global _fa4
    if _fa4 is None:
        _fa4 = False
        if (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10)
                and os.environ.get("CPTRAIN_FA4", "1") != "0"):  # CPTRAIN_FA4=0: torch's FA2 kernels instead
            try:
                import flash_attn.cute.interface as _fa4  # noqa: F811
            except ImportError:
                pass
    return _fa4 or None


# FlashAttention-4 as custom ops, so torch.compile keeps each block one graph around them (its own
# autograd.Function would be traced into). torch's FA4 hook (torch.nn.attention._fa4) does not match
# the flash-attn-4 releases that run on torch 2.11, hence these ~30 lines.
@torch.library.custom_op("cptrain::fa4_varlen_fwd", mutates_args=())
def _fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, *_ = _fa4._flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                       max_seqlen_k=max_len, softmax_scale=scale, causal=True, return_lse=True)
    return out, lse


@_fa4_fwd.register_fake
def _(q, k, v, cu, max_len, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)  # out [T, H, hd], lse [H, T]


@torch.library.custom_op("cptrain::fa4_varlen_bwd", mutates_args=())
def _fa4_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
             cu: torch.Tensor, max_len: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _fa4._flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, scale, True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                      max_seqlen_q=max_len, max_seqlen_k=max_len)
    return dq, dk, dv


@_fa4_bwd.register_fake
def _(dout, q, k, v, out, lse, cu, max_len, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fa4_setup(ctx, inputs, output):
    q, k, v, cu, ctx.max_len, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu)


def _fa4_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    return *_fa4_bwd(dout, q, k, v, out, lse, cu, ctx.max_len, ctx.scale), None, None, None


_fa4_fwd.register_autograd(_fa4_backward, setup_context=_fa4_setup)


def resolve_backend(name: str, device: torch.device, softcap: float | None = None, window: int | None = None,
                    custom_scale: bool = False) -> str:
    """The backend that will run `name` on `device` for a layer with these needs, saying once what
    stands in for what. "eager" (explicit scores) is the exact CPU path for soft-capped scores."""
    cuda = device.type == "cuda"
    capped = "flex" if cuda else "eager"  # the backends that soft-cap scores: flex_attention's score_mod, explicit scores
    if name == "flash_attn":
        if not cuda or (flash_attn_func is None and torch_varlen_attn is None):
            why = f"device is {device.type}" if not cuda else "neither flash-attn nor torch's varlen_attn is installed"
            name = "sdpa"
            _warn_once(f"attention 'flash_attn' unavailable ({why}); using sdpa (same result)")
        elif flash_attn_func is None and (softcap or (custom_scale and "scale" not in _VARLEN_ARGS)
                                          or (window and "window_size" not in _VARLEN_ARGS)):
            what = "score soft-capping" if softcap else "a custom score scale" if custom_scale else "sliding windows"
            _warn_once(f"attention 'flash_attn': torch's varlen kernels have no {what}; those layers use flex")
            return "flex"
    if name == "flex" and not cuda:
        # FlexAttention has no CPU backward (torch 2.13); SDPA with the same dense mask is exact.
        _warn_once(f"attention 'flex' runs on CUDA only; on {device.type} using {'explicit scores' if softcap else 'sdpa'} "
                   "with an explicit mask")
        return "eager" if softcap else "sdpa"
    if name == "sdpa" and softcap:
        _warn_once(f"attention 'sdpa' cannot soft-cap scores; those layers use {'flex' if cuda else 'explicit scores'}")
        return capped
    return name


def build_context(backend: str, doc_ids: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  batch: int, seq_len: int, device: torch.device, scale: float | None = None,
                  softcap: float | None = None, window: int | None = None) -> AttentionContext:
    """The context of one layer kind; `doc_ids` None means no document masking."""
    custom_scale = scale is not None and abs(scale - cos.shape[-1] ** -0.5) > 1e-12
    backend = resolve_backend(backend, device, softcap, window, custom_scale)
    extra = dict(scale=scale, softcap=softcap, window=window)
    if backend == "flex":
        return AttentionContext(cos, sin, backend, _flex_block_mask(doc_ids, batch, seq_len, device, window), **extra)
    if backend == "flash_attn":
        # FA4 (decided here, outside the compiled blocks, which then only read the choice) takes
        # full-attention layers; a window goes to torch's varlen kernels, which take one.
        fa4 = flash_attn_func is None and window is None and fa4_interface(device) is not None
        if doc_ids is not None:
            return AttentionContext(cos, sin, backend, _varlen_info(doc_ids), **extra)
        if fa4 or (window and flash_attn_func is None):  # each row is one document (FA4 beats SDPA's cuDNN causal kernel)
            rows = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)
            return AttentionContext(cos, sin, backend, VarlenInfo(rows, seq_len), **extra)
        return AttentionContext(cos, sin, backend, None, **extra)
    if doc_ids is None and not window:
        return AttentionContext(cos, sin, backend, None, **extra)
    return AttentionContext(cos, sin, backend, doc_causal_mask(doc_ids, window, seq_len, device), **extra)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """q [B, S, H, hd], k/v [B, S, KV, hd] -> [B, S, H, hd] with the context's backend and mask."""
    if ctx.distributed is not None:
        return ctx.distributed(q, k, v)
    if ctx.backend == "flash_attn":
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise UserError(f"attention 'flash_attn' needs bf16/fp16 activations, got {q.dtype}; "
                            "train with bf16 mixed precision or set model.attention: sdpa")
        if flash_attn_func is not None or ctx.mask is not None:
            return _flash(q, k, v, ctx)
        # Without the flash-attn package, plain causal attention goes to SDPA (cuDNN or flash kernels).
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # -> [B, heads, S, hd]
    gqa = q.shape[1] != k.shape[1]
    if ctx.backend == "flex":
        score_mod = None
        if ctx.softcap:
            cap = ctx.softcap

            def score_mod(score, b, h, q_idx, kv_idx):
                return torch.tanh(score / cap) * cap
        return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=ctx.mask, scale=ctx.scale,
                                enable_gqa=gqa).transpose(1, 2)
    if ctx.backend == "eager":
        return _explicit(q, k, v, ctx).transpose(1, 2)
    # SDPA's CUDA flash/memory-efficient kernels take enable_gqa only without a mask and with
    # head_dim <= 256; otherwise it silently runs the O(S^2)-memory math kernel (the same rule as
    # transformers' `use_gqa_in_sdpa`), so there kv heads are repeated instead.
    if gqa and (ctx.mask is not None or q.shape[-1] > 256):
        k, v = _repeat_kv(k, v, q.shape[1])
        gqa = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None, scale=ctx.scale,
                                         enable_gqa=gqa)
    return out.transpose(1, 2)  # -> [B, S, H, hd]


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, n_heads: int, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    rep = n_heads // k.shape[dim]
    return k.repeat_interleave(rep, dim=dim), v.repeat_interleave(rep, dim=dim)


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """Scores, soft-cap, mask, float32 softmax, values: q/k/v [B, heads, S, hd] (the order of
    transformers' eager attention, which the Gemma 2 checkpoints were checked against)."""
    k, v = _repeat_kv(k, v, q.shape[1])
    scores = (q @ k.transpose(-1, -2)) * (ctx.scale if ctx.scale is not None else q.shape[-1] ** -0.5)
    if ctx.softcap:
        scores = torch.tanh(scores / ctx.softcap) * ctx.softcap
    mask = ctx.mask if ctx.mask is not None else doc_causal_mask(None, ctx.window, q.shape[2], q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    varlen, left = ctx.mask, (ctx.window - 1 if ctx.window else -1)  # flash-attn windows: keys in [i - left, i]
    if varlen is None:  # GQA is native in flash-attn
        return flash_attn_func(q, k, v, causal=True, softmax_scale=ctx.scale, window_size=(left, -1 if left < 0 else 0),
                               softcap=ctx.softcap or 0.0)
    b, s, h, hd = q.shape
    q, k, v = q.reshape(b * s, h, hd), k.reshape(b * s, -1, hd), v.reshape(b * s, -1, hd)
    cu, max_len = varlen.cu_seqlens, varlen.max_seqlen
    if flash_attn_varlen_func is not None:
        out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True, softmax_scale=ctx.scale,
                                     window_size=(left, -1 if left < 0 else 0), softcap=ctx.softcap or 0.0)
    elif ctx.window is None and fa4_interface(q.device) is not None:  # GQA is native in FA4 too
        scale = ctx.scale if ctx.scale is not None else hd ** -0.5
        out = _fa4_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu, max_len, scale)[0]  # the fakes assume contiguous
    else:
        kwargs = _varlen_causal_kwargs(h != k.shape[1], ctx.window)
        if ctx.scale is not None and "scale" in _VARLEN_ARGS:  # else the default scale, as resolve_backend checked
            kwargs["scale"] = ctx.scale
        out = torch_varlen_attn(q, *_varlen_kv(k, v, h), cu, cu, max_len, max_len, **kwargs)
    return out.reshape(b, s, h, hd)


def _varlen_kv(k: torch.Tensor, v: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    if k.shape[1] == n_heads or "enable_gqa" in _VARLEN_ARGS:
        return k, v
    return _repeat_kv(k, v, n_heads)  # a varlen_attn without enable_gqa (torch 2.11): repeat the kv heads


def _varlen_causal_kwargs(gqa: bool, window: int | None = None) -> dict:
    # torch 2.11 and 2.13 express causality as window_size (-1, 0), and a sliding window as
    # (window - 1, 0); a varlen_attn taking is_causal gets that instead. enable_gqa appeared after 2.11.
    if window:
        kwargs = {"window_size": (window - 1, 0)}
    else:
        kwargs = {"is_causal": True} if "is_causal" in _VARLEN_ARGS else {"window_size": (-1, 0)}
    if gqa and "enable_gqa" in _VARLEN_ARGS:
        kwargs["enable_gqa"] = True
    return kwargs


_flex_fn = None


def _compiled_flex():
    # Uncompiled flex_attention runs a slow reference path; compiled once, it generates a fused kernel.
    global _flex_fn
    if _flex_fn is None:
        from torch.nn.attention.flex_attention import flex_attention
        _flex_fn = torch.compile(flex_attention, dynamic=False)
    return _flex_fn
