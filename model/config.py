"""LlamaConfig: the model's shape, presets, HF config.json <-> LlamaConfig, parameter counts and
FLOPs per token."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import UserError

ATTENTION_BACKENDS = ("sdpa", "flash_attn", "flex")
# The keys of a Llama-3 `rope_scaling` dict (HF `rope_type: llama3`, Llama 3.1 report sec. 3.x / the
# reference `apply_scaling` in meta-llama/llama-models).
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000  # tokens in the vocabulary (rows of the embedding and output head)
    dim: int = 4096  # width of the residual stream (HF hidden_size)
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads; head_dim = dim // n_heads
    n_kv_heads: int = 32  # key/value heads (grouped-query attention when < n_heads)
    ffn_dim: int = 11008  # hidden width of the SwiGLU MLP (HF intermediate_size)
    norm_eps: float = 1e-5  # epsilon inside RMSNorm
    rope_theta: float = 10000.0  # RoPE base period
    rope_scaling: dict | None = None  # Llama-3 frequency scaling (LLAMA3_ROPE_KEYS) or None for plain RoPE
    max_seq_len: int = 4096  # longest sequence the model is meant for (HF max_position_embeddings)
    tie_embeddings: bool = False  # share the input embedding with the output head
    attention: str = "sdpa"  # attention backend: "sdpa", "flash_attn" or "flex"
    # Attend only within a document and restart RoPE positions at each document start, as Llama 3
    # was pretrained ("an attention mask that prevents self-attention between different documents").
    doc_masking: bool = True
    init_std: float = 0.02  # std of the normal init of linears and embeddings (GPT-2/GPT-3/HF Llama value)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self, source: str = "model config") -> LlamaConfig:
        """Raise UserError on an inconsistent shape; return self so calls can chain."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{source}: {name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise UserError(f"{source}: dim {self.dim} is not divisible by n_heads {self.n_heads}; "
                            "pick n_heads dividing dim")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"{source}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}; "
                            "pick n_kv_heads dividing n_heads")
        if self.head_dim % 2:
            raise UserError(f"{source}: head_dim {self.head_dim} (dim / n_heads) must be even for RoPE")
        if self.attention not in ATTENTION_BACKENDS:
            raise UserError(f"{source}: attention {self.attention!r} is unknown; "
                            f"use one of {', '.join(ATTENTION_BACKENDS)}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{source}: {name} must be a positive number, got {value!r}")
        for name in ("tie_embeddings", "doc_masking"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{source}: {name} must be true or false, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling, source)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "model config") -> LlamaConfig:
        """Build from a plain dict (model_config.json, a YAML section); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"{source}: unknown model keys {unknown}; valid keys are {sorted(names)}")
        return cls(**d).validate(source)


def _validate_rope_scaling(rs: dict, source: str) -> None:
    if not isinstance(rs, dict) or rs.get("rope_type", "llama3") != "llama3":
        raise UserError(f"{source}: rope_scaling {rs!r} is not supported; only Llama-3 scaling "
                        f"(rope_type 'llama3' with {', '.join(LLAMA3_ROPE_KEYS)}) or null")
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in rs]
    if missing:
        raise UserError(f"{source}: rope_scaling lacks {missing}; Llama-3 scaling needs {', '.join(LLAMA3_ROPE_KEYS)}")
    if not rs["low_freq_factor"] < rs["high_freq_factor"]:
        raise UserError(f"{source}: rope_scaling low_freq_factor must be < high_freq_factor")


def _llama3_rope(factor: float) -> dict:
    # Values of the released Llama 3.1/3.2 config.json files.
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


def _swiglu_width(dim: int, multiple_of: int = 128) -> int:
    # 2/3 of a 4*dim MLP gives SwiGLU's three matrices the parameters of two (Shazeer 2020, "GLU
    # Variants Improve Transformer"), rounded up to a multiple as Llama's `multiple_of` does.
    return multiple_of * math.ceil(8 * dim / 3 / multiple_of)


PRESETS: dict[str, LlamaConfig] = {
    # For tests: GQA (2 query heads per kv head), a few hundred thousand parameters.
    "tiny": LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                        max_seq_len=256),
    # GPT-3 Small, Medium and XL widths and depths (Brown et al. 2020, table 2.1) as Llama blocks with
    # a Llama-2 sized vocabulary, untied. "350M" (373.9M in all) and "1.3B" (1345M) are exactly the
    # 374M and 1.35B models of the peer GPU baseline in docs/benchmarks.md (HF Llama, vocab 32000).
    "125M": LlamaConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12,
                        ffn_dim=_swiglu_width(768), max_seq_len=2048),
    "350M": LlamaConfig(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, n_kv_heads=16,
                        ffn_dim=_swiglu_width(1024), max_seq_len=2048),
    "1.3B": LlamaConfig(vocab_size=32000, dim=2048, n_layers=24, n_heads=16, n_kv_heads=16,
                        ffn_dim=_swiglu_width(2048), max_seq_len=2048),
    # meta-llama/Llama-3.2-1B and Llama-3.2-3B config.json.
    "1B": LlamaConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                      rope_theta=500000.0, rope_scaling=_llama3_rope(32.0), max_seq_len=131072,
                      tie_embeddings=True),
    "3B": LlamaConfig(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192,
                      rope_theta=500000.0, rope_scaling=_llama3_rope(32.0), max_seq_len=131072,
                      tie_embeddings=True),
    # meta-llama/Llama-2-7b-hf config.json.
    "7B": LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                      max_seq_len=4096),
    # meta-llama/Llama-3.1-8B config.json.
    "8B": LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      rope_theta=500000.0, rope_scaling=_llama3_rope(8.0), max_seq_len=131072),
}


def preset(name: str) -> LlamaConfig:
    """A fresh copy of a preset (callers may change fields without touching PRESETS)."""
    if name not in PRESETS:
        raise UserError(f"model preset {name!r} is unknown; valid presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    rs = dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None
    return dataclasses.replace(cfg, rope_scaling=rs)


def _hf_rope(hf: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either transformers-5 `rope_parameters` or the older
    top-level `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UserError(f"{source}: RoPE type {rope_type!r} is not supported; cptrain supports default and llama3 RoPE")
    scaling = {"rope_type": "llama3", **{k: params[k] for k in LLAMA3_ROPE_KEYS if k in params}}
    _validate_rope_scaling(scaling, source)
    return theta, scaling


def from_hf_config(hf: dict, source: str = "config.json") -> LlamaConfig:
    """LlamaConfig from an HF LlamaForCausalLM config.json dict; `source` names the file in errors."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or (archs and archs != ["LlamaForCausalLM"]):
        raise UserError(f"{source}: model_type {hf.get('model_type')!r} / architectures {archs} is not a "
                        "LlamaForCausalLM; cptrain imports Llama-architecture checkpoints only")
    unsupported = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}
    for key, ok in unsupported.items():
        if hf.get(key, ok) != ok:
            raise UserError(f"{source}: {key}={hf[key]!r} is not supported (cptrain's Llama needs {key}={ok!r})")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // n_heads):
        raise UserError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads; "
                        "decoupled head_dim is not supported")
    theta, scaling = _hf_rope(hf, source)
    cfg = LlamaConfig(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, ffn_dim=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    return cfg.validate(source)


def to_hf_config(cfg: LlamaConfig) -> dict:
    """An HF LlamaForCausalLM config.json dict. RoPE is written both as transformers-5
    `rope_parameters` and as the older `rope_theta`/`rope_scaling`, so readers of either vintage agree."""
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope_parameters = {**cfg.rope_scaling, "rope_type": "llama3", "rope_theta": cfg.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope_parameters, "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None,  # a copy: HF edits it
        "attention_bias": False, "mlp_bias": False, "initializer_range": cfg.init_std,
    }


def param_counts(cfg: LlamaConfig) -> tuple[int, int]:
    """(total, non_embedding); non-embedding leaves out the input embedding and an untied output head."""
    d, hd = cfg.dim, cfg.head_dim
    attention = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # wq, wo + wk, wv
    block = attention + 3 * d * cfg.ffn_dim + 2 * d  # + SwiGLU w1, w2, w3 + two RMSNorm weights
    non_embedding = cfg.n_layers * block + d  # + final norm
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return non_embedding + embeddings, non_embedding


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the weight matmuls forward + backward, plus 12*L*d*S for the
    attention scores and values (Kaplan et al. 2020 sec. 2.1; PaLM appendix B's MFU formula)."""
    _, non_embedding = param_counts(cfg)
    return 6 * non_embedding + 12 * cfg.n_layers * cfg.dim * seq_len
