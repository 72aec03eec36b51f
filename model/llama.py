"""The Llama decoder: RMSNorm, RoPE (incl. Llama-3 frequency scaling), grouped-query attention,
SwiGLU MLP, tied or untied embeddings. Knows nothing of distribution, data or training.

RoPE uses the rotate-half convention of HF transformers, so HF q/k weights load without the
permutation that Meta's interleaved checkpoints need.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionContext, attend, build_context, doc_positions
from .config import LlamaConfig


def rope_inv_freq(cfg: LlamaConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (float32), with Llama-3 scaling when configured. The
    arithmetic follows transformers' `_compute_llama3_parameters` op for op, so results match bitwise."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    # Llama 3.1: wavelengths longer than original_len / low_freq_factor are stretched by `factor`,
    # shorter than original_len / high_freq_factor are kept, and the band between is interpolated.
    factor, old_len = rs["factor"], rs["original_max_position_embeddings"]
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(cfg: LlamaConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, S] -> (cos, sin) [B, S, head_dim] float32."""
    inv_freq = rope_inv_freq(cfg, positions.device)
    freqs = positions[..., None].float() * inv_freq  # [B, S, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: both halves share a frequency
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, hd] rotated by cos/sin [B, S, hd]."""
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 and scale in the input dtype, as HF's LlamaRMSNorm does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)  # [B, S, H, hd]
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)  # [B, S, KV, hd]
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        out = attend(q, k, v, ctx)  # [B, S, H, hd]
        return self.wo(out.reshape(b, s, -1))  # [B, S, D]


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm decoder block; takes hidden states [B, S, D] and the shared AttentionContext."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), ctx)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """RoPE frequencies are computed in each forward (a few hundred floats) rather than kept in a
    buffer: nothing can go stale after a meta build + to_empty(), a checkpoint load that skips
    init_weights(), or a cast of the model to bf16."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize every parameter in place, in a fixed order (deterministic given the torch RNG)."""
        std = self.cfg.init_std
        # Output projections feeding the residual stream are scaled by 1/sqrt(number of residual
        # additions), 2 per block, so the stream's variance does not grow with depth (GPT-2,
        # Radford et al. 2019, sec. 2.3; also Megatron-LM and OLMo).
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, 0.0, std)
        for layer in self.layers:
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
                        layer.feed_forward.w1, layer.feed_forward.w3):
                nn.init.normal_(lin.weight, 0.0, std)
            nn.init.normal_(layer.attention.wo.weight, 0.0, residual_std)
            nn.init.normal_(layer.feed_forward.w2.weight, 0.0, residual_std)
            nn.init.ones_(layer.attention_norm.weight)
            nn.init.ones_(layer.ffn_norm.weight)
        nn.init.ones_(self.norm.weight)
        if self.output is not None:
            nn.init.normal_(self.output.weight, 0.0, std)

    def attention_context(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> AttentionContext:
        """RoPE cos/sin and the backend's mask for tokens [B, S] (doc_ids [B, S] or None)."""
        b, s = tokens.shape
        if not self.cfg.doc_masking:
            doc_ids = None
        if doc_ids is None:
            positions = torch.arange(s, device=tokens.device)[None]  # [1, S], shared by all rows
        else:
            positions = doc_positions(doc_ids)  # [B, S]
        cos, sin = rope_cos_sin(self.cfg, positions)
        return build_context(self.cfg.attention, doc_ids, cos, sin, b, s, tokens.device)

    def hidden(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] -> final-norm hidden states [B, S, D]."""
        ctx = self.attention_context(tokens, doc_ids)
        h = self.tok_embeddings(tokens)  # [B, S, D]
        for layer in self.layers:
            h = layer(h, ctx)
        return self.norm(h)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> logits [..., V] (the output head, or the embedding when tied)."""
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(hidden, weight)

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, V]."""
        return self.head(self.hidden(tokens, doc_ids))
