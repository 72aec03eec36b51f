"""A family's Hugging Face config.json <-> ModelConfig, both ways.

Everything the families share (shape keys, RoPE, layer types) is read and written once here; what
differs is data in each family's record (model/families.py): its switches, its optional settings and
their keys, required values, defaults and sliding-window layout. Anything a checkpoint sets that the
decoder does not implement is refused with one line naming it.
"""
from __future__ import annotations

from ..errors import UserError
from .config import ModelConfig
from .families import FAMILIES, OPTIONAL, Family
from .rope import ROPE_KEYS, validate_rope_scaling

_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}
_HF_KIND = {"full_attention": "full", "sliding_attention": "sliding"}
# What transformers assumes for these keys in every family (a family's `defaults` come on top).
_SHARED_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
                    "tie_word_embeddings": False}


def supported() -> str:
    return ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values())


def _rope(params: dict, max_len: int, source: str) -> tuple[float, dict | None]:
    """(theta, scaling) of one RoPE parameter dict, read as transformers 5 standardizes it: the kind in
    `rope_type` (or the older `type`), and for llama3 and yarn an original_max_position_embeddings that
    defaults to max_position_embeddings. Other kinds (dynamic, longrope, ...) are refused."""
    params = dict(params)
    theta = float(params.pop("rope_theta"))
    kind = params.pop("rope_type", None) or params.get("type") or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", None)
    if partial not in (None, 1, 1.0):
        raise UserError(f"{source}: partial_rotary_factor={partial!r} is not supported (cptrain rotates whole heads)")
    if kind == "default":
        return theta, None
    if kind not in ROPE_KEYS:
        raise UserError(f"{source}: RoPE type {kind!r} is not supported; cptrain supports default, "
                        f"{', '.join(ROPE_KEYS)} RoPE (and any rope_theta)")
    scaling = {"rope_type": kind, **params}
    if "original_max_position_embeddings" in ROPE_KEYS[kind][0]:
        scaling.setdefault("original_max_position_embeddings", max_len)
    validate_rope_scaling(scaling, source)
    return theta, scaling


def _rope_of(h: dict, family: Family, source: str) -> dict:
    """ModelConfig's rope fields. As transformers 5 reads them: the older top-level `rope_scaling` wins
    over `rope_parameters` and `rope_theta` fills in a dict without one; where the family keeps a base for
    its sliding layers (Gemma 3) `rope_parameters` holds a dict per layer type, `rope_scaling` updates
    the full layers' and `rope_local_base_freq` is the sliding layers' base."""
    max_len = h["max_position_embeddings"]
    if "rope_local_theta" not in family.options:
        params = h.get("rope_scaling") or h.get("rope_parameters") or {}
        theta, scaling = _rope({"rope_theta": h["rope_theta"], **params}, max_len, source)
        return {"rope_theta": theta, "rope_scaling": scaling}
    params = h.get("rope_parameters") or {}
    full = {"rope_theta": h["rope_theta"], **(params.get("full_attention") or {}), **(h.get("rope_scaling") or {})}
    local = {"rope_theta": h["rope_local_base_freq"], **(params.get("sliding_attention") or {})}
    theta, scaling = _rope(full, max_len, source)
    local_theta, local_scaling = _rope(local, max_len, source)
    if local_scaling is not None:
        raise UserError(f"{source}: RoPE scaling on the sliding-window layers is not supported (cptrain scales the full layers only)")
    return {"rope_theta": theta, "rope_scaling": scaling, "rope_local_theta": local_theta}


def _layer_types(h: dict, family: Family, n_layers: int, source: str) -> tuple[int | None, list[str]]:
    """(sliding_window, layer_types) as ModelConfig keeps them: no list when every layer is alike."""
    if family.sliding == "none":
        return None, []
    window = h.get("sliding_window")
    if family.sliding == "window_layers" and not h.get("use_sliding_window", False):
        window = None  # transformers reads `sliding_window` only with use_sliding_window
    if family.sliding == "all" or not window:
        return window or None, []
    if h.get("layer_types"):
        unknown = sorted(set(h["layer_types"]) - set(_HF_KIND))
        if unknown:
            raise UserError(f"{source}: layer_types {unknown} are not supported; cptrain has full_attention and sliding_attention")
        kinds = [_HF_KIND[k] for k in h["layer_types"]]
    elif family.sliding == "window_layers":
        kinds = ["sliding" if i >= h.get("max_window_layers", n_layers) else "full" for i in range(n_layers)]
    elif family.sliding == "alternating":
        kinds = ["sliding" if i % 2 == 0 else "full" for i in range(n_layers)]
    else:  # pattern: every `sliding_window_pattern`-th layer is global
        kinds = ["sliding" if (i + 1) % h["sliding_window_pattern"] else "full" for i in range(n_layers)]
    if len(kinds) != n_layers:
        raise UserError(f"{source}: layer_types lists {len(kinds)} layers, num_hidden_layers is {n_layers}")
    return window, [] if len(set(kinds)) == 1 and kinds[0] == "sliding" else kinds


def _moe_of(h: dict, family: Family, n_layers: int) -> dict:
    """ModelConfig's moe_* fields of a mixture-of-experts family's config.json (model/families.py MoEKeys)."""
    keys = family.moe
    if keys is None:
        return {}
    experts = next((h[k] for k in keys.experts if h.get(k) is not None), 0)
    if not experts:  # a Qwen MoE config with num_experts 0: every layer dense
        return {"moe_aux_loss_coef": float(h["router_aux_loss_coef"])}
    dense = []
    if keys.dense_layers:  # as transformers builds the layers: mlp_only_layers, and all but every decoder_sparse_step-th
        step = h.get("decoder_sparse_step") or 1
        dense = [i for i in range(n_layers) if i in (h.get("mlp_only_layers") or []) or (i + 1) % step]
    return dict(n_experts=experts, moe_top_k=h["num_experts_per_tok"], moe_ffn_dim=h[keys.width],
                moe_norm_topk=keys.norm_topk if isinstance(keys.norm_topk, bool) else bool(h.get(keys.norm_topk, False)),
                moe_dense_layers=dense, moe_shared_ffn_dim=h["shared_expert_intermediate_size"] if keys.shared else 0,
                moe_aux_loss_coef=float(h["router_aux_loss_coef"]))


def _moe_keys(cfg: ModelConfig, family: Family) -> dict:
    """The config.json keys of cfg's moe_* fields. output_router_logits stays false, as released checkpoints
    have it: transformers then returns no router logits at inference; cptrain's training always balances."""
    keys = family.moe
    if keys is None:
        return {}
    out = {keys.experts[0]: cfg.n_experts, "num_experts_per_tok": cfg.moe_top_k, keys.width: cfg.moe_ffn_dim or cfg.ffn_dim,
           "router_aux_loss_coef": cfg.moe_aux_loss_coef, "output_router_logits": False}
    if isinstance(keys.norm_topk, str):
        out[keys.norm_topk] = cfg.moe_norm_topk
    if keys.dense_layers:
        out.update(mlp_only_layers=list(cfg.moe_dense_layers), decoder_sparse_step=1)
    if keys.shared:
        out["shared_expert_intermediate_size"] = cfg.moe_shared_ffn_dim
    return out


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF config.json dict; `source` names the file in errors."""
    family = _BY_MODEL_TYPE.get(hf.get("model_type"))
    archs = hf.get("architectures") or []
    if family is None or (archs and archs[0] != family.architecture):
        what = f"model_type {hf.get('model_type')!r}" + (f" / architectures {archs}" if archs else "")
        raise UserError(f"{source}: {what} is not supported; cptrain imports {supported()}")
    # An absent or null key means transformers' default, which is also what `required` holds.
    h = {**_SHARED_DEFAULTS, **family.defaults, **{k: v for k, v in hf.items() if v is not None}}
    for key, ok in family.required.items():
        if h.get(key, ok) != ok:
            raise UserError(f"{source}: {key}={h[key]!r} is not supported for {family.model_type} (cptrain needs {key}={ok!r})")
    dim, n_heads, n_layers = h["hidden_size"], h["num_attention_heads"], h["num_hidden_layers"]
    head_dim = h.get("head_dim") or dim // n_heads
    window, kinds = _layer_types(h, family, n_layers, source)
    fields = dict(
        family=family.name, vocab_size=h["vocab_size"], dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=h.get("num_key_value_heads") or n_heads, head_dim=0 if head_dim == dim // n_heads else head_dim,
        ffn_dim=h["intermediate_size"], norm_eps=float(h["rms_norm_eps"]), max_seq_len=h["max_position_embeddings"],
        tie_embeddings=bool(h["tie_word_embeddings"]), sliding_window=window, layer_types=kinds,
        **_rope_of(h, family, source), **family.switches, **_moe_of(h, family, n_layers))
    if "attn_scale_dim" in family.options:
        scalar = h["query_pre_attn_scalar"]
        fields["attn_scale_dim"] = 0 if scalar == head_dim else int(scalar)
    fields.update({name: h.get(OPTIONAL[name]) for name in ("attn_softcap", "final_softcap") if name in family.options})
    return ModelConfig(**fields).validate(source)


def _rope_dict(theta: float, scaling: dict | None) -> dict:
    return {**(scaling or {"rope_type": "default"}), "rope_theta": theta}


def to_hf_config(cfg: ModelConfig) -> dict:
    """The HF config.json dict of `cfg`, which transformers loads as its family's architecture. RoPE is
    written both as transformers-5 `rope_parameters` and as the older top-level keys, so readers of
    either vintage agree."""
    family = FAMILIES[cfg.family]
    out = {
        "architectures": [family.architecture], "model_type": family.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_size,
        "intermediate_size": cfg.ffn_dim, "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, **family.required,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None,  # a copy: HF edits it
    }
    if "rope_local_theta" in family.options:
        local = cfg.rope_local_theta or cfg.rope_theta
        out.update(rope_parameters={"full_attention": _rope_dict(cfg.rope_theta, cfg.rope_scaling),
                                    "sliding_attention": _rope_dict(local, None)}, rope_local_base_freq=local)
    else:
        out["rope_parameters"] = _rope_dict(cfg.rope_theta, cfg.rope_scaling)
    kinds = cfg.kinds
    if family.sliding == "all":
        out["sliding_window"] = cfg.sliding_window
    elif family.sliding != "none":
        out.update(sliding_window=cfg.sliding_window, layer_types=[f"{k}_attention" for k in kinds])
        if family.sliding == "window_layers":
            out.update(use_sliding_window="sliding" in kinds,
                       max_window_layers=kinds.index("sliding") if "sliding" in kinds else cfg.n_layers)
    if "attn_scale_dim" in family.options:
        out["query_pre_attn_scalar"] = cfg.attn_scale_dim or cfg.head_size
    out.update({OPTIONAL[name]: getattr(cfg, name) for name in ("attn_softcap", "final_softcap") if name in family.options})
    out.update(_moe_keys(cfg, family))
    return out
