"""The Hugging Face side of each family: config.json <-> ModelConfig, both ways.

A family is a `model_type` and an architecture class in transformers. Everything the families share
(shape keys, RoPE, layer types) is read and written once; what differs is a short table of keys per
family. Tensor names do not depend on the family, only on the switches (model/hf.py). Anything a
checkpoint sets that the decoder does not implement is refused with one line naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from .config import FAMILIES, FAMILY_SWITCHES, LLAMA3_ROPE_KEYS, ModelConfig, validate_rope_scaling


@dataclass(frozen=True)
class Family:
    name: str  # ModelConfig.family
    model_type: str  # config.json `model_type`
    architecture: str  # config.json `architectures[0]`
    tied_default: bool = False  # tie_word_embeddings when config.json leaves it out (the transformers default)
    required: dict = field(default_factory=dict)  # config.json keys the decoder implements only at these values
    sliding: str = "none"  # none | all (Mistral: every layer) | layers (per layer: Qwen's max_window_layers, Gemma's pattern)


_SILU = {"hidden_act": "silu"}
_GEMMA_REQUIRED = {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False}
SPECS = {s.name: s for s in (
    Family("llama", "llama", "LlamaForCausalLM", required={**_SILU, "attention_bias": False, "mlp_bias": False}),
    Family("mistral", "mistral", "MistralForCausalLM", required=_SILU, sliding="all"),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", required=_SILU, sliding="layers"),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", required={**_SILU, "attention_bias": False}, sliding="layers"),
    Family("gemma2", "gemma2", "Gemma2ForCausalLM", tied_default=True, required=_GEMMA_REQUIRED, sliding="layers"),
    Family("gemma3", "gemma3_text", "Gemma3ForCausalLM", tied_default=True,
           required={**_GEMMA_REQUIRED, "use_bidirectional_attention": False}, sliding="layers"),
    Family("olmo2", "olmo2", "Olmo2ForCausalLM", required={**_SILU, "attention_bias": False}),
)}
assert tuple(SPECS) == FAMILIES
_BY_MODEL_TYPE = {s.model_type: s for s in SPECS.values()}
_HF_KIND = {"full_attention": "full", "sliding_attention": "sliding"}


def supported() -> str:
    return ", ".join(f"{s.model_type} ({s.architecture})" for s in SPECS.values())


def _rope(params: dict, source: str) -> tuple[float, dict | None]:
    """(theta, scaling) of one RoPE parameter dict (transformers-5 `rope_parameters` style)."""
    params = dict(params)
    theta = float(params.pop("rope_theta"))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(params["factor"])}
    elif kind == "llama3":
        scaling = {"rope_type": "llama3", **{k: params[k] for k in LLAMA3_ROPE_KEYS if k in params}}
    else:
        raise UserError(f"{source}: RoPE type {kind!r} is not supported; cptrain supports default, linear and llama3 RoPE")
    validate_rope_scaling(scaling, source)
    return theta, scaling


def _rope_of(hf: dict, spec: Family, source: str) -> dict:
    """ModelConfig's rope fields from either transformers-5 `rope_parameters` (per layer type for Gemma 3)
    or the older top-level `rope_theta` / `rope_scaling` / `rope_local_base_freq`."""
    params = hf.get("rope_parameters") or {}
    legacy = {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})}
    if spec.name != "gemma3":
        theta, scaling = _rope({"rope_theta": legacy["rope_theta"], **params} if params else legacy, source)
        return {"rope_theta": theta, "rope_scaling": scaling}
    full = params.get("full_attention") or {**legacy, "rope_theta": hf.get("rope_theta", 1_000_000.0)}
    local = params.get("sliding_attention") or {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    theta, scaling = _rope(full, source)
    local_theta, local_scaling = _rope(local, source)
    if local_scaling is not None:
        raise UserError(f"{source}: RoPE scaling on the sliding-window layers is not supported (cptrain scales the full layers only)")
    return {"rope_theta": theta, "rope_scaling": scaling, "rope_local_theta": local_theta}


def _layer_types(hf: dict, spec: Family, n_layers: int, source: str) -> tuple[int | None, list[str]]:
    """(sliding_window, layer_types) as ModelConfig keeps them: no list when every layer is alike."""
    if spec.sliding == "none":
        return None, []
    window = hf.get("sliding_window")
    if spec.name in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None  # transformers reads `sliding_window` only with use_sliding_window
    if spec.sliding == "all" or not window:
        return window or None, []
    if hf.get("layer_types"):
        unknown = sorted(set(hf["layer_types"]) - set(_HF_KIND))
        if unknown:
            raise UserError(f"{source}: layer_types {unknown} are not supported; cptrain has full_attention and sliding_attention")
        kinds = [_HF_KIND[k] for k in hf["layer_types"]]
    elif spec.name in ("qwen2", "qwen3"):
        kinds = ["sliding" if i >= hf.get("max_window_layers", n_layers) else "full" for i in range(n_layers)]
    elif spec.name == "gemma2":
        kinds = ["sliding" if i % 2 == 0 else "full" for i in range(n_layers)]
    else:  # Gemma 3: every `sliding_window_pattern`-th layer is global
        pattern = hf.get("sliding_window_pattern", 6)
        kinds = ["sliding" if (i + 1) % pattern else "full" for i in range(n_layers)]
    if len(kinds) != n_layers:
        raise UserError(f"{source}: layer_types lists {len(kinds)} layers, num_hidden_layers is {n_layers}")
    return window, [] if len(set(kinds)) == 1 and kinds[0] == "sliding" else kinds


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF config.json dict; `source` names the file in errors."""
    spec = _BY_MODEL_TYPE.get(hf.get("model_type"))
    archs = hf.get("architectures") or []
    if spec is None or (archs and archs[0] != spec.architecture):
        what = f"model_type {hf.get('model_type')!r}" + (f" / architectures {archs}" if archs else "")
        raise UserError(f"{source}: {what} is not supported; cptrain imports {supported()}")
    for key, ok in spec.required.items():
        value = hf.get(key)
        if value is not None and value != ok:  # absent or null: the transformers default, which is `ok`
            raise UserError(f"{source}: {key}={value!r} is not supported for {spec.model_type} (cptrain needs {key}={ok!r})")
    dim, n_heads, n_layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or dim // n_heads
    window, kinds = _layer_types(hf, spec, n_layers, source)
    fields = dict(
        family=spec.name, vocab_size=hf["vocab_size"], dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=0 if head_dim == dim // n_heads else head_dim,
        ffn_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", spec.tied_default)),
        sliding_window=window, layer_types=kinds, **_rope_of(hf, spec, source), **FAMILY_SWITCHES[spec.name])
    if spec.name in ("gemma2", "gemma3"):
        scalar = hf.get("query_pre_attn_scalar", 256)
        fields.update(attn_scale_dim=0 if scalar == head_dim else int(scalar),
                      attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"))
    return ModelConfig(**fields).validate(source)


def _rope_dict(theta: float, scaling: dict | None) -> dict:
    return {**(scaling or {"rope_type": "default"}), "rope_theta": theta}


def to_hf_config(cfg: ModelConfig) -> dict:
    """The HF config.json dict of `cfg`, which transformers loads as its family's architecture. RoPE is
    written both as transformers-5 `rope_parameters` and as the older top-level keys, so readers of
    either vintage agree."""
    spec = SPECS[cfg.family]
    out = {
        "architectures": [spec.architecture], "model_type": spec.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_size,
        "intermediate_size": cfg.ffn_dim, "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, **spec.required,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None,  # a copy: HF edits it
    }
    if spec.name == "gemma3":
        local = cfg.rope_local_theta or cfg.rope_theta
        out.update(rope_parameters={"full_attention": _rope_dict(cfg.rope_theta, cfg.rope_scaling),
                                    "sliding_attention": _rope_dict(local, None)}, rope_local_base_freq=local)
    else:
        out["rope_parameters"] = _rope_dict(cfg.rope_theta, cfg.rope_scaling)
    kinds = cfg.kinds
    if spec.sliding == "all":
        out["sliding_window"] = cfg.sliding_window
    elif spec.sliding == "layers":
        out.update(sliding_window=cfg.sliding_window, layer_types=[f"{k}_attention" for k in kinds])
        if spec.name in ("qwen2", "qwen3"):
            out.update(use_sliding_window="sliding" in kinds,
                       max_window_layers=kinds.index("sliding") if "sliding" in kinds else cfg.n_layers)
    if spec.name in ("gemma2", "gemma3"):
        out.update(query_pre_attn_scalar=cfg.attn_scale_dim or cfg.head_size, attn_logit_softcapping=cfg.attn_softcap,
                   final_logit_softcapping=cfg.final_softcap)
    return out
