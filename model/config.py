"""ModelConfig: the shape of a decoder and the few switches on which the families differ; parameter
counts and FLOPs per token. The switches are named for what they do; each family's record
(model/families.py) says which it fixes and which optional settings it carries, model/hf_config.py
maps its Hugging Face config.json onto them, and model/presets.py holds the shapes as data."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from ..errors import UserError
from .families import FAMILIES, OPTIONAL
from .rope import validate_rope_scaling

ATTENTION_BACKENDS = ("sdpa", "flash_attn", "flex")
LAYER_TYPES = ("full", "sliding")


@dataclass
class ModelConfig:
    family: str = "llama"  # the family record (model/families.py): its switches and HF architecture
    vocab_size: int = 32000  # tokens in the vocabulary (rows of the embedding and output head)
    dim: int = 4096  # width of the residual stream (HF hidden_size)
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int = 32  # key/value heads (grouped-query attention when < n_heads)
    head_dim: int = 0  # width of one head; 0: dim // n_heads (Qwen3, Gemma set their own)
    ffn_dim: int = 11008  # hidden width of the gated MLP (HF intermediate_size)
    norm_eps: float = 1e-5  # epsilon inside RMSNorm
    rope_theta: float = 10000.0  # RoPE base period
    rope_scaling: dict | None = None  # {rope_type: linear|llama3|yarn, ...} as transformers' rope_parameters (model/rope.py)
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers, unscaled (Gemma 3: 10000); None: as the others
    max_seq_len: int = 4096  # longest sequence the model is meant for (HF max_position_embeddings)
    tie_embeddings: bool = False  # share the input embedding with the output head
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: Literal["none", "head", "full"] = "none"  # RMSNorm of q and k: per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2)
    norm_placement: Literal["pre", "post", "sandwich"] = "pre"  # block norms before attention and MLP (Llama), after them (OLMo 2), or both (Gemma)
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight), weights starting at 0 (Gemma)
    activation: Literal["silu", "gelu_tanh"] = "silu"  # gate of the gated MLP: SwiGLU, or GeGLU with tanh GELU (Gemma)
    embed_scale: bool = False  # embeddings multiplied by sqrt(dim) (Gemma)
    attn_scale_dim: int = 0  # attention scores scaled by attn_scale_dim ** -0.5 (HF query_pre_attn_scalar); 0: head_dim
    attn_softcap: float | None = None  # scores soft-capped as c * tanh(s / c) (Gemma 2: 50)
    final_softcap: float | None = None  # logits soft-capped likewise (Gemma 2: 30)
    sliding_window: int | None = None  # tokens a sliding-window layer's query sees, itself included
    layer_types: list[str] = field(default_factory=list)  # "full" | "sliding" per layer; empty: all sliding with sliding_window, else all full
    attention: str = "sdpa"  # attention backend: "sdpa", "flash_attn" or "flex"
    # Attend only within a document and restart RoPE positions at each document start, as Llama 3
    # was pretrained ("an attention mask that prevents self-attention between different documents").
    doc_masking: bool = True
    init_std: float = 0.02  # std of the normal init of linears and embeddings (GPT-2/GPT-3/HF Llama value)
    # Mixture of experts (model/moe.py), in the families whose record has `moe` (model/families.py):
    n_experts: int = 0  # routed experts of each MoE layer; 0: every layer has the dense MLP
    moe_top_k: int = 0  # experts each token is sent to (HF num_experts_per_tok)
    moe_ffn_dim: int = 0  # hidden width of each expert's gated MLP (HF moe_intermediate_size, or intermediate_size)
    moe_norm_topk: bool = False  # the top-k routing weights renormalized to sum to 1 (HF norm_topk_prob; Mixtral always)
    moe_dense_layers: list[int] = field(default_factory=list)  # layers that keep the dense MLP of width ffn_dim (Qwen MoE mlp_only_layers)
    moe_shared_ffn_dim: int = 0  # width of a shared expert every token passes through, gated by a sigmoid (Qwen2-MoE); 0: none
    moe_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in training (HF router_aux_loss_coef)
    # the router's scores: softmax over the experts (every HF family here), or sigmoid per expert
    # (DeepSeek-V3; not exportable to these families' HF configs)
    moe_router: str = "softmax"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def moe_layers(self) -> list[bool]:
        """Whether each layer's feed-forward is a mixture of experts (else the dense gated MLP)."""
        dense = set(self.moe_dense_layers)
        return [self.n_experts > 0 and i not in dense for i in range(self.n_layers)]

    @property
    def kinds(self) -> list[str]:
        """The attention kind of every layer ("full" or "sliding")."""
        return list(self.layer_types) or ["sliding" if self.sliding_window else "full"] * self.n_layers

    def validate(self, source: str = "model config") -> ModelConfig:
        """Raise UserError on an inconsistent shape; return self so calls can chain."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{source}: {name} must be a positive integer, got {value!r}")
        if self.family not in FAMILIES:
            raise UserError(f"{source}: family {self.family!r} is unknown; use one of {', '.join(FAMILIES)}")
        family, defaults = FAMILIES[self.family], ModelConfig()
        for name, want in {**{k: getattr(defaults, k) for f in FAMILIES.values() for k in f.switches},
                           **family.switches}.items():
            if getattr(self, name) != want:
                raise UserError(f"{source}: {name}={getattr(self, name)!r} is not a {self.family} model's ({want!r}); "
                                f"the family fixes it (or pick the family that has it)")
        for name in OPTIONAL:
            if name not in family.options and getattr(self, name) != getattr(defaults, name):
                able = [f.name for f in FAMILIES.values() if name in f.options]
                raise UserError(f"{source}: {name} is not part of a {self.family} model; families with it: {', '.join(able)}")
        if not self.head_dim and self.dim % self.n_heads:
            raise UserError(f"{source}: dim {self.dim} is not divisible by n_heads {self.n_heads}; "
                            "pick n_heads dividing dim, or set head_dim")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"{source}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}; "
                            "pick n_kv_heads dividing n_heads")
        if self.head_dim < 0 or self.head_size % 2:
            raise UserError(f"{source}: head_dim {self.head_size} must be a positive even number (RoPE rotates pairs)")
        if self.attention not in ATTENTION_BACKENDS:
            raise UserError(f"{source}: attention {self.attention!r} is unknown; use one of {', '.join(ATTENTION_BACKENDS)}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{source}: {name} must be a positive number, got {value!r}")
        for name in ("rope_local_theta", "attn_softcap", "final_softcap", "sliding_window"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"{source}: {name} must be positive or null, got {value!r}")
        if self.layer_types and (len(self.layer_types) != self.n_layers or set(self.layer_types) - set(LAYER_TYPES)):
            raise UserError(f"{source}: layer_types must list {self.n_layers} entries, each one of {', '.join(LAYER_TYPES)}")
        if "sliding" in self.kinds and not self.sliding_window:
            raise UserError(f"{source}: layer_types has sliding layers but sliding_window is not set")
        _validate_moe(self, family, source)
        if self.rope_scaling is not None:
            validate_rope_scaling(self.rope_scaling, source)
            if "rope_local_theta" in family.options and self.rope_scaling.get("truncate", True) is not True:
                # transformers reads `truncate` beside the per-layer-type dicts, where it never is
                raise UserError(f"{source}: rope_scaling truncate={self.rope_scaling['truncate']!r} is not supported for "
                                f"{self.family} (transformers truncates YaRN's ramp of per-layer-type RoPE always); remove it")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "model config") -> ModelConfig:
        """Build from a plain dict (model_config.json, a YAML section); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"{source}: unknown model keys {unknown}; valid keys are {sorted(names)}")
        return cls(**d).validate(source)


_MOE_FIELDS = ("n_experts", "moe_top_k", "moe_ffn_dim", "moe_norm_topk", "moe_dense_layers", "moe_shared_ffn_dim",
               "moe_aux_loss_coef", "moe_router")


def _validate_moe(cfg: ModelConfig, family, source: str) -> None:
    defaults, keys = ModelConfig(), family.moe
    if keys is None:
        if any(getattr(cfg, n) != getattr(defaults, n) for n in _MOE_FIELDS):
            able = [f.name for f in FAMILIES.values() if f.moe is not None]
            raise UserError(f"{source}: a {cfg.family} model has no mixture of experts; families with one: {', '.join(able)}")
        return
    if cfg.n_experts < 0 or (cfg.n_experts and not 0 < cfg.moe_top_k <= cfg.n_experts):
        raise UserError(f"{source}: moe_top_k={cfg.moe_top_k} must be between 1 and n_experts={cfg.n_experts}")
    if cfg.n_experts and cfg.moe_ffn_dim <= 0:
        raise UserError(f"{source}: moe_ffn_dim must be a positive integer with n_experts={cfg.n_experts}")
    if isinstance(keys.norm_topk, bool) and cfg.moe_norm_topk != keys.norm_topk:
        raise UserError(f"{source}: moe_norm_topk={cfg.moe_norm_topk} is not a {cfg.family} model's ({keys.norm_topk}); the family fixes it")
    if keys.width == "intermediate_size" and cfg.moe_ffn_dim != cfg.ffn_dim:
        raise UserError(f"{source}: a {cfg.family} model's experts have the dense width: set moe_ffn_dim = ffn_dim = {cfg.moe_ffn_dim}")
    if cfg.moe_dense_layers and (not keys.dense_layers or not set(cfg.moe_dense_layers) <= set(range(cfg.n_layers))):
        raise UserError(f"{source}: moe_dense_layers {cfg.moe_dense_layers} must be layer indices below n_layers={cfg.n_layers}"
                        + ("" if keys.dense_layers else f" (a {cfg.family} model has none)"))
    if cfg.moe_shared_ffn_dim < 0 or bool(cfg.moe_shared_ffn_dim) != (keys.shared and cfg.n_experts > 0):
        what = "has a shared expert: set it positive" if keys.shared else "has no shared expert"
        raise UserError(f"{source}: moe_shared_ffn_dim={cfg.moe_shared_ffn_dim}: an MoE {cfg.family} model {what}")
    if cfg.moe_router not in ("softmax", "sigmoid"):
        raise UserError(f"{source}: moe_router={cfg.moe_router!r} must be softmax or sigmoid")
    if cfg.moe_aux_loss_coef < 0:
        raise UserError(f"{source}: moe_aux_loss_coef={cfg.moe_aux_loss_coef} must be at least 0")


def swiglu_width(dim: int, multiple_of: int = 128) -> int:
    # 2/3 of a 4*dim MLP gives SwiGLU's three matrices the parameters of two (Shazeer 2020, "GLU
    # Variants Improve Transformer"), rounded up to a multiple as Llama's `multiple_of` does.
    return multiple_of * math.ceil(8 * dim / 3 / multiple_of)


def _ffn_params(cfg: ModelConfig, moe: bool, active: bool) -> int:
    """Parameters of one layer's feed-forward; of an MoE layer, those one token uses when `active` (the
    router, its top-k experts and the shared expert), else all of them."""
    d = cfg.dim
    if not moe:
        return 3 * d * cfg.ffn_dim
    shared = 3 * d * cfg.moe_shared_ffn_dim + d if cfg.moe_shared_ffn_dim else 0  # + the shared expert's gate
    return d * cfg.n_experts + (cfg.moe_top_k if active else cfg.n_experts) * 3 * d * cfg.moe_ffn_dim + shared


def param_counts(cfg: ModelConfig, active: bool = False) -> tuple[int, int]:
    """(total, non_embedding); non-embedding leaves out the input embedding and an untied output head.
    active: the parameters one token passes through (an MoE layer's router and top-k experts, not all)."""
    d, hd, q, kv = cfg.dim, cfg.head_size, cfg.n_heads * cfg.head_size, cfg.n_kv_heads * cfg.head_size
    attention = 2 * d * q + 2 * d * kv + (q + 2 * kv) * cfg.qkv_bias  # wq, wo, wk, wv (+ q/k/v biases)
    attention += {"none": 0, "head": 2 * hd, "full": q + kv}[cfg.qk_norm]
    norms = (4 if cfg.norm_placement == "sandwich" else 2) * d
    ffn = sum(_ffn_params(cfg, moe, active) for moe in cfg.moe_layers)
    non_embedding = cfg.n_layers * (attention + norms) + ffn + d  # + gated MLPs or experts; final norm
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return non_embedding + embeddings, non_embedding


def _attended(cfg: ModelConfig, seq_len: int) -> float:
    """Keys a query attends to, averaged over positions and summed over layers, under causal
    masking: (S + 1) / 2 on a full layer, min(i, window) on a sliding one (documents not counted:
    document masking only saves work a dense count would claim)."""
    full = (seq_len + 1) / 2
    total = 0.0
    for kind in cfg.kinds:
        w = cfg.sliding_window if kind == "sliding" else None
        total += full if not w or w >= seq_len else (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token, the count MFU is taken from (as torchtitan and OLMo-core count
    them): 6 per weight of every matmul, forward and backward (the blocks' and the output head's;
    an embedding lookup is no matmul), plus the attention scores and values, 12 * heads * head_dim
    per attended key, with causal attention attending half the keys of full attention. Of a mixture
    of experts only the active parameters count (the router, the top-k experts, a shared one)."""
    _, non_embedding = param_counts(cfg, active=True)
    return 6 * (non_embedding + cfg.vocab_size * cfg.dim) + 12 * cfg.n_heads * cfg.head_size * _attended(cfg, seq_len)


def hardware_flops_per_token(cfg: ModelConfig, seq_len: int, activation_checkpointing: bool = False) -> float:
    """FLOPs the device does per token: the model's, plus the blocks' forward again when activation
    checkpointing recomputes it in backward (a third of their training FLOPs)."""
    _, non_embedding = param_counts(cfg, active=True)
    blocks = 6 * non_embedding + 12 * cfg.n_heads * cfg.head_size * _attended(cfg, seq_len)
    return flops_per_token(cfg, seq_len) + (blocks / 3 if activation_checkpointing else 0.0)
