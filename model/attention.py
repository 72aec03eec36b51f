"""Attention backends (sdpa, flash_attn, flex) and document masking.

A forward pass builds one `AttentionContext` (RoPE cos/sin plus whatever the backend needs to
mask) and hands it to every block, so a block is self-contained for FSDP, activation
checkpointing and torch.compile. A "document" is a maximal run of equal `doc_ids` in a row: a
token attends to earlier tokens of its own document only, and RoPE positions restart at each run.
"""
from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any

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
    """What every block needs besides its hidden states; built once per forward."""
    cos: torch.Tensor  # [B, S, head_dim] float32 (B may be 1 when positions are shared)
    sin: torch.Tensor  # [B, S, head_dim] float32
    backend: str  # the backend actually used: "sdpa", "flash_attn" or "flex"
    # None: plain causal. sdpa: bool [B, 1, S, S] (True = may attend). flash_attn: VarlenInfo.
    # flex: a BlockMask (document-causal or causal).
    mask: Any = None


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


def doc_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Dense bool mask [B, 1, S, S]: query i may attend key j iff j <= i in the same document."""
    _, seg = doc_segments(doc_ids)
    s = doc_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def _varlen_info(doc_ids: torch.Tensor) -> VarlenInfo:
    starts, _ = doc_segments(doc_ids)
    flat = starts.flatten().nonzero().flatten()  # every row's first token is a start
    total = torch.tensor([starts.numel()], device=doc_ids.device)
    cu = torch.cat([flat, total]).to(torch.int32)
    torch._dynamo.maybe_mark_dynamic(cu, 0)  # the number of documents changes every batch: no recompiles
    return VarlenInfo(cu_seqlens=cu, max_seqlen=doc_ids.shape[1])


def _flex_block_mask(doc_ids: torch.Tensor | None, batch: int, seq_len: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    if doc_ids is None:
        def mask_mod(b, h, q, kv):
            return q >= kv
        return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device)
    _, seg = doc_segments(doc_ids)

    def doc_mask_mod(b, h, q, kv):
        return (seg[b, q] == seg[b, kv]) & (q >= kv)
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
def _fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, *_ = _fa4._flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                       max_seqlen_k=max_len, causal=True, return_lse=True)
    return out, lse


@_fa4_fwd.register_fake
def _(q, k, v, cu, max_len):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)  # out [T, H, hd], lse [H, T]


@torch.library.custom_op("cptrain::fa4_varlen_bwd", mutates_args=())
def _fa4_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
             cu: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _fa4._flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, None, True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                      max_seqlen_q=max_len, max_seqlen_k=max_len)
    return dq, dk, dv


@_fa4_bwd.register_fake
def _(dout, q, k, v, out, lse, cu, max_len):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fa4_setup(ctx, inputs, output):
    q, k, v, cu, ctx.max_len = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu)


def _fa4_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    return *_fa4_bwd(dout, q, k, v, out, lse, cu, ctx.max_len), None, None


_fa4_fwd.register_autograd(_fa4_backward, setup_context=_fa4_setup)


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend that will run `name` on `device`, warning once about each fallback."""
    if name == "flash_attn" and (device.type != "cuda" or (flash_attn_func is None and torch_varlen_attn is None)):
        why = f"device is {device.type}" if device.type != "cuda" else "neither flash-attn nor torch's varlen_attn is installed"
        _warn_once(f"attention 'flash_attn' unavailable ({why}); using sdpa (same result)")
        return "sdpa"
    if name == "flex" and device.type != "cuda":
        # FlexAttention has no CPU backward (torch 2.13); SDPA with the same dense mask is exact.
        _warn_once(f"attention 'flex' runs on CUDA only; on {device.type} using sdpa with an explicit mask")
        return "sdpa"
    return name


def build_context(backend: str, doc_ids: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  batch: int, seq_len: int, device: torch.device) -> AttentionContext:
    """The per-forward context; `doc_ids` None means plain causal attention."""
    backend = resolve_backend(backend, device)
    # FA4 is decided here, outside the compiled blocks, which then only read the choice.
    fa4 = backend == "flash_attn" and flash_attn_func is None and fa4_interface(device) is not None
    if backend == "flex":
        return AttentionContext(cos, sin, backend, _flex_block_mask(doc_ids, batch, seq_len, device))
    if doc_ids is None and fa4:  # FA4's kernel beats SDPA's cuDNN causal one: each row is one document
        rows = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)
        return AttentionContext(cos, sin, backend, VarlenInfo(rows, seq_len))
    if doc_ids is None:
        return AttentionContext(cos, sin, backend, None)
    if backend == "flash_attn":
        return AttentionContext(cos, sin, backend, _varlen_info(doc_ids))
    return AttentionContext(cos, sin, backend, doc_causal_mask(doc_ids))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """q [B, S, H, hd], k/v [B, S, KV, hd] -> [B, S, H, hd] with the context's backend and mask."""
    if ctx.backend == "flash_attn":
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise UserError(f"attention 'flash_attn' needs bf16/fp16 activations, got {q.dtype}; "
                            "train with bf16 mixed precision or set model.attention: sdpa")
        if flash_attn_func is not None or ctx.mask is not None:
            return _flash(q, k, v, ctx.mask)
        # Without the flash-attn package, plain causal attention goes to SDPA (cuDNN or flash kernels).
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # -> [B, heads, S, hd]
    gqa = q.shape[1] != k.shape[1]
    if ctx.backend == "flex":
        return _compiled_flex()(q, k, v, block_mask=ctx.mask, enable_gqa=gqa).transpose(1, 2)
    # SDPA's CUDA flash/memory-efficient kernels take enable_gqa only without a mask and with
    # head_dim <= 256; otherwise it silently runs the O(S^2)-memory math kernel (the same rule as
    # transformers' `use_gqa_in_sdpa`), so there kv heads are repeated instead.
    if gqa and (ctx.mask is not None or q.shape[-1] > 256):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None, enable_gqa=gqa)
    return out.transpose(1, 2)  # -> [B, S, H, hd]


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: VarlenInfo | None) -> torch.Tensor:
    if varlen is None:
        return flash_attn_func(q, k, v, causal=True)  # GQA is native in flash-attn
    b, s, h, hd = q.shape
    q, k, v = q.reshape(b * s, h, hd), k.reshape(b * s, -1, hd), v.reshape(b * s, -1, hd)
    cu, max_len = varlen.cu_seqlens, varlen.max_seqlen
    if flash_attn_varlen_func is not None:
        out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
    elif fa4_interface(q.device) is not None:  # GQA is native in FA4 too
        out = _fa4_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu, max_len)[0]  # the fakes assume contiguous
    else:
        out = torch_varlen_attn(q, *_varlen_kv(k, v, h), cu, cu, max_len, max_len, **_varlen_causal_kwargs(h != k.shape[1]))
    return out.reshape(b, s, h, hd)


def _varlen_kv(k: torch.Tensor, v: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    if k.shape[1] == n_heads or "enable_gqa" in _VARLEN_ARGS:
        return k, v
    rep = n_heads // k.shape[1]  # a varlen_attn without enable_gqa (torch 2.11): repeat the kv heads
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def _varlen_causal_kwargs(gqa: bool) -> dict:
    # torch 2.11 and 2.13 express causality as window_size (-1, 0); a varlen_attn taking is_causal gets
    # that instead. enable_gqa appeared after 2.11.
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
