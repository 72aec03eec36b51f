"""The decoder: one block with a few switches (model/config.py) covers Llama, Mistral, Qwen2/2.5,
Qwen3, Gemma 2/3, OLMo 2 and the mixtures of experts Qwen2/3-MoE, OLMoE and Mixtral. RMSNorm, RoPE
(every kind of model/rope.py; a base of its own for sliding-window layers), grouped-query attention
with optional q/k biases and q/k norms, a gated MLP (SwiGLU or tanh-GELU GeGLU) or a mixture of
such experts (model/moe.py), norms before and/or after attention and MLP, soft-capped logits.
Knows nothing of distribution, data or training.

RoPE uses the rotate-half convention of HF transformers, so HF q/k weights load without the
permutation that Meta's interleaved checkpoints need.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionContext, attend, build_context, doc_positions
from .config import ModelConfig
from .mlp import FeedForward, gated  # noqa: F401 (gated: engines compile it as a region of the block)
from .moe import MoE, compute_dtype
from .rope import apply_rope, rope_cos_sin, rope_init


def rope_of(cfg: ModelConfig, kind: str) -> tuple[float, dict | None]:
    """(theta, scaling) of a layer kind: sliding layers have a base of their own when set (Gemma 3)."""
    if kind == "sliding" and cfg.rope_local_theta:
        return cfg.rope_local_theta, None
    return cfg.rope_theta, cfg.rope_scaling


# The parameter-free computations of a block are plain functions that modules reach through an
# attribute (`self.kernel`, `self.core`, `self.gate`): an engine whose parameter hooks sit on every
# module (ZeRO-3) compiles these regions alone, never a module boundary (trainer/engines/base.py).
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:  # Gemma scales by (1 + w) in float32, then casts (transformers PR 29402)
        return (xf * (1.0 + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)  # normalize in float32, scale in the input dtype, as HF's Llama


def rope_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """RoPE on q [B, S, H, hd] and k [B, S, KV, hd], then attention -> [B, S, H, hd]."""
    return attend(apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin), v, ctx)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernel = rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.eps, self.unit_offset)


def _norm(cfg: ModelConfig, dim: int, present: bool = True) -> nn.Module:
    return RMSNorm(dim, cfg.norm_eps, cfg.norm_unit_offset) if present else nn.Identity()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        q, kv = cfg.n_heads * cfg.head_size, cfg.n_kv_heads * cfg.head_size
        self.wq = nn.Linear(cfg.dim, q, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, kv, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, kv, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q, cfg.dim, bias=False)
        # q/k norm: over each head (Qwen3, Gemma 3) or over the whole projection (OLMo 2).
        self.qk_norm, self.core = cfg.qk_norm, rope_attend
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = _norm(cfg, cfg.head_size if per_head else q)
            self.k_norm = _norm(cfg, cfg.head_size if per_head else kv)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, self.n_heads, self.head_dim)  # [B, S, H, hd]
        k = k.view(b, s, self.n_kv_heads, self.head_dim)  # [B, S, KV, hd]
        v = v.view(b, s, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        # An fp32 norm weight under autocast promotes the normed q and k to fp32; attention takes them in
        # v's dtype (the flash kernels take nothing else, and SDPA's autocast would cast them the same way).
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = self.core(q, k, v, ctx)  # [B, S, H, hd]
        return self.wo(out.reshape(b, s, -1))  # [B, S, D]


class Block(nn.Module):
    """One decoder block; takes hidden states [B, S, D] and the AttentionContext of its kind. Norms sit
    before attention and MLP ("pre", Llama), after them ("post", OLMo 2) or both ("sandwich", Gemma);
    an absent one is an Identity, so the state dict holds exactly the norms a family has. The
    feed-forward is the dense gated MLP or, with `moe`, a mixture of experts (model/moe.py)."""

    def __init__(self, cfg: ModelConfig, kind: str, moe: bool = False):
        super().__init__()
        self.kind = kind  # "full" or "sliding": which context of the forward it reads
        before, after = cfg.norm_placement in ("pre", "sandwich"), cfg.norm_placement in ("post", "sandwich")
        self.attention_norm, self.attention_out_norm = _norm(cfg, cfg.dim, before), _norm(cfg, cfg.dim, after)
        self.attention = Attention(cfg)
        self.ffn_norm, self.ffn_out_norm = _norm(cfg, cfg.dim, before), _norm(cfg, cfg.dim, after)
        self.feed_forward = MoE(cfg) if moe else FeedForward(cfg)

    def forward(self, x: torch.Tensor, contexts: dict[str, AttentionContext]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states [B, S, D], the MoE layer's router statistics (model/moe.py pack_stats) or None).
        The statistics are an output, not state: recomputed with the block under activation checkpointing."""
        h = x + self.attention_out_norm(self.attention(self.attention_norm(x), contexts[self.kind]))
        out, stats = self.feed_forward(self.ffn_norm(h)), None
        if isinstance(self.feed_forward, MoE):
            out, stats = out
        return h + self.ffn_out_norm(out), stats


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma 2's logit soft-capping); identity without a cap."""
    return x if cap is None else torch.tanh(x / cap) * cap


class Decoder(nn.Module):
    """RoPE frequencies are computed in each forward (a few hundred floats) rather than kept in a
    buffer: nothing can go stale after a meta build + to_empty(), a checkpoint load that skips
    init_weights(), or a cast of the model to bf16."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, kind, moe) for kind, moe in zip(cfg.kinds, cfg.moe_layers))
        self.norm = _norm(cfg, cfg.dim)
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
            a = layer.attention
            # (w1, w3, w2) of the dense MLP, or of the experts and a shared expert; drawn in the dense
            # model's order (wq, wk, wv, w1, w3, wo, w2), so a dense model's initial weights are unchanged
            mlps = layer.feed_forward.mlps() if isinstance(layer.feed_forward, MoE) else [layer.feed_forward]
            for lin in (a.wq, a.wk, a.wv):
                nn.init.normal_(lin.weight, 0.0, std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            for w in (w for mlp in mlps for w in (mlp.w1, mlp.w3)):
                nn.init.normal_(getattr(w, "weight", w), 0.0, std)
            nn.init.normal_(a.wo.weight, 0.0, residual_std)
            for mlp in mlps:
                nn.init.normal_(getattr(mlp.w2, "weight", mlp.w2), 0.0, residual_std)
            if isinstance(layer.feed_forward, MoE):
                layer.feed_forward.init_router(std)
        for module in self.modules():  # every norm starts as the identity: weight 1, or 0 under (1 + w)
            if isinstance(module, RMSNorm):
                (nn.init.zeros_ if module.unit_offset else nn.init.ones_)(module.weight)
        if self.output is not None:
            nn.init.normal_(self.output.weight, 0.0, std)

    def attention_context(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None,
                          split=None) -> dict[str, AttentionContext]:
        """Per layer kind, RoPE cos/sin and the backend's mask for tokens [B, S] (doc_ids [B, S] or None).
        `split` (context parallelism): these are this rank's tokens of longer rows; it gives their
        positions in the row and builds each kind's context, whose attention covers the whole row."""
        cfg, (b, s) = self.cfg, tokens.shape
        if not cfg.doc_masking:
            doc_ids = None
        if split is not None:
            positions = split.positions  # [B or 1, S]: where this rank's tokens sit in their documents
        elif doc_ids is None:
            positions = torch.arange(s, device=tokens.device)[None]  # [1, S], shared by all rows
        else:
            positions = doc_positions(doc_ids)  # [B, S]
        scale = (cfg.attn_scale_dim or cfg.head_size) ** -0.5
        contexts = {}
        for kind in dict.fromkeys(cfg.kinds):
            theta, scaling = rope_of(cfg, kind)
            inv_freq, rope_scale = rope_init(theta, cfg.head_size, scaling, tokens.device)
            cos, sin = rope_cos_sin(inv_freq, rope_scale, positions)
            window = cfg.sliding_window if kind == "sliding" else None
            if split is not None:
                contexts[kind] = split.context(cfg.attention, cos, sin, scale=scale, softcap=cfg.attn_softcap, window=window)
            else:
                contexts[kind] = build_context(cfg.attention, doc_ids, cos, sin, b, s, tokens.device, scale=scale,
                                               softcap=cfg.attn_softcap, window=window)
        return contexts

    def hidden(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None, split=None,
               aux: dict | None = None) -> torch.Tensor:
        """tokens [B, S] -> final-norm hidden states [B, S, D]; `split` as in attention_context. With a
        dict `aux`, a mixture of experts puts its router statistics there: aux["router"] [MoE layers,
        2E + 4] (model/moe.py router_losses reads them), with their gradient."""
        contexts = self.attention_context(tokens, doc_ids, split)
        h = self.tok_embeddings(tokens)  # [B, S, D]
        # The residual stream in the compute dtype: under autocast the fp32 embedding would carry fp32
        # through every block (twice the norms' and additions' memory traffic), where FSDP2's and
        # DeepSpeed's bf16 weights give bf16, as in the other trainers.
        h = h.to(compute_dtype(h))
        if self.cfg.embed_scale:  # sqrt(dim) in the weights' dtype, as Gemma computes it (55.5, not 55.43, in bf16)
            h = h * torch.tensor(self.cfg.dim**0.5, dtype=h.dtype)
        routers = []
        for layer in self.layers:
            h, stats = layer(h, contexts)
            if stats is not None:
                routers.append(stats)
        if aux is not None and routers:
            aux["router"] = torch.stack(routers)
        return self.norm(h)

    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> logits [..., V] (the output head, or the embedding when tied; soft-capped when configured)."""
        return softcap(F.linear(hidden, self.head_weight()), self.cfg.final_softcap)

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None, split=None,
                logits_to_keep: int = 0, aux: dict | None = None) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, V]; with logits_to_keep = k > 0, those of the last k positions
        only [B, k, V] (as transformers' argument of that name: scoring a short answer after a long
        prompt never holds the prompt's [B, S, V] logits). `split` and `aux` as in hidden()."""
        h = self.hidden(tokens, doc_ids, split, aux)
        return self.head(h[:, -logits_to_keep:] if logits_to_keep else h)
