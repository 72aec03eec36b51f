"""Rotary position embeddings, one place for every family: the kinds of frequency scaling a model
may carry, the keys of each and their checks, and each kind's inverse frequencies and attention scale.

`ModelConfig.rope_scaling` is transformers' `rope_parameters` dict without `rope_theta` (None: plain
RoPE, Su et al. 2021, with base `rope_theta`):
- linear: position interpolation (Chen et al. 2023), every frequency divided by `factor`.
- llama3: Llama 3.1's band-wise interpolation: long wavelengths divided by `factor`, short ones kept,
  a smooth ramp between `original_max_position_embeddings / low_freq_factor` and `/ high_freq_factor`.
- yarn: "NTK-by-parts" (Peng et al. 2023): dimensions turning fewer than `beta_slow` times in the
  original window are interpolated by `factor`, those turning more than `beta_fast` times are kept, a
  linear ramp between; plus an attention temperature, cos and sin scaled by 0.1 ln(factor) + 1
  (`attention_factor`, or from `mscale` / `mscale_all_dim` as DeepSeek's configs give it).
A change of base ("ABF", Xiong et al. 2023) is a new `rope_theta` and needs no kind of its own.

The arithmetic follows transformers 5 (`transformers/modeling_rope_utils.py`) op for op, so the
frequencies and the scale equal its own bitwise.
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError

# rope_type -> (required keys, optional keys), as transformers validates them.
ROPE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
}
# YaRN's ramp bounds in rotations over the original window (Peng et al. 2023, sec. 3.2; transformers' defaults).
YARN_BETA_FAST, YARN_BETA_SLOW = 32, 1


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_rope_scaling(rs, source: str) -> None:
    """One line naming the key and the fix for anything but a complete, consistent dict of one kind."""
    kind = rs.get("rope_type") if isinstance(rs, dict) else None
    if kind not in ROPE_KEYS:
        raise UserError(f"{source}: rope_scaling {rs!r} is not supported; use Llama-3 scaling (rope_type 'llama3' with "
                        f"{', '.join(ROPE_KEYS['llama3'][0])}), linear scaling (rope_type 'linear' with factor), YaRN "
                        f"(rope_type 'yarn' with factor, original_max_position_embeddings) or null")
    required, optional = ROPE_KEYS[kind]
    missing = [k for k in required if k not in rs]
    if missing:
        raise UserError(f"{source}: rope_scaling lacks {missing}; {kind} scaling needs {', '.join(required)}")
    unknown = sorted(set(rs) - {"rope_type", *required, *optional})
    if unknown:
        raise UserError(f"{source}: rope_scaling keys {unknown} are not part of {kind} scaling (cptrain implements "
                        f"{', '.join(required + optional)}); remove them")
    if not _number(rs["factor"]) or not rs["factor"] > 0:
        raise UserError(f"{source}: rope_scaling factor must be a positive number, got {rs['factor']!r}")
    old = rs.get("original_max_position_embeddings", 1)
    if isinstance(old, bool) or not isinstance(old, int) or old <= 0:
        raise UserError(f"{source}: rope_scaling original_max_position_embeddings must be a positive integer, got {old!r}")
    if kind == "llama3" and not rs["low_freq_factor"] < rs["high_freq_factor"]:
        raise UserError(f"{source}: rope_scaling low_freq_factor must be < high_freq_factor")
    if kind == "yarn":
        _validate_yarn(rs, source)


def _validate_yarn(rs: dict, source: str) -> None:
    for key in ("attention_factor", "beta_fast", "beta_slow"):  # null: the default
        if rs.get(key) is not None and (not _number(rs[key]) or not rs[key] > 0):
            raise UserError(f"{source}: rope_scaling {key} must be a positive number or null, got {rs[key]!r}")
    for key in ("mscale", "mscale_all_dim"):
        if rs.get(key) is not None and not _number(rs[key]):
            raise UserError(f"{source}: rope_scaling {key} must be a number or null, got {rs[key]!r}")
    if rs.get("truncate") is not None and not isinstance(rs["truncate"], bool):
        raise UserError(f"{source}: rope_scaling truncate must be true or false, got {rs['truncate']!r}")
    if not (rs.get("beta_fast") or YARN_BETA_FAST) > (rs.get("beta_slow") or YARN_BETA_SLOW):
        raise UserError(f"{source}: rope_scaling beta_fast must exceed beta_slow (defaults {YARN_BETA_FAST} and "
                        f"{YARN_BETA_SLOW}), got {rs.get('beta_fast')!r} and {rs.get('beta_slow')!r}")


def _base_powers(theta: float, head_dim: int, device) -> torch.Tensor:
    """theta ** (2i / head_dim) for i < head_dim / 2, float32: the wavelengths over 2 pi."""
    return theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)


def _llama3(inv_freq: torch.Tensor, rs: dict) -> torch.Tensor:
    # Wavelengths longer than original_len / low_freq_factor are stretched by `factor`, shorter than
    # original_len / high_freq_factor are kept, and the band between is interpolated.
    factor, old_len = rs["factor"], rs["original_max_position_embeddings"]
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(factor: float, mscale: float = 1) -> float:
    # sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023, eq. 22), none when not extending.
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(theta: float, dim: int, rs: dict, device) -> tuple[torch.Tensor, float]:
    factor, old_len = rs["factor"], rs["original_max_position_embeddings"]
    scale = rs.get("attention_factor")
    if scale is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        scale = (float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)) if mscale and mscale_all_dim
                 else _yarn_mscale(factor))

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times in old_len
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = correction_dim(rs.get("beta_fast") or YARN_BETA_FAST)
    high = correction_dim(rs.get("beta_slow") or YARN_BETA_SLOW)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    powers = _base_powers(theta, dim, device)
    keep = 1 - ramp.to(device=device, dtype=torch.float)  # 1: the frequency is kept (extrapolated), 0: interpolated
    return (1.0 / (factor * powers)) * (1 - keep) + (1.0 / powers) * keep, scale


def rope_init(theta: float, head_dim: int, scaling: dict | None,
              device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] float32, attention scale) of one RoPE: the scale multiplies
    cos and sin (1.0 except for YaRN), as transformers' rotary embeddings apply it."""
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "yarn":
        return _yarn(theta, head_dim, scaling, device)
    inv_freq = 1.0 / _base_powers(theta, head_dim, device)
    if kind == "linear":  # positions divided by the factor (Chen et al. 2023, position interpolation)
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    return inv_freq, 1.0


def rope_cos_sin(inv_freq: torch.Tensor, scale: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, S] -> (cos, sin) [B, S, head_dim] float32, times the attention scale."""
    freqs = positions[..., None].float() * inv_freq  # [B, S, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: both halves share a frequency
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, hd] rotated by cos/sin [B, S, hd]."""
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
