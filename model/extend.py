"""Extending a model's context window: the `model.extend` config section and the RoPE settings and
maximum length it gives the model it is applied to (`model.init_from`'s, or the preset's). The run's
checkpoints carry the result, and `cptrain convert cptrain-to-hf` writes it as transformers reads it.
Methods, formulas and when to use each: docs/long_context.md ("Extending RoPE").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..errors import UserError
from .config import ModelConfig
from .rope import YARN_BETA_FAST, YARN_BETA_SLOW


@dataclass
class ExtendConfig:
    method: Literal["off", "yarn", "linear", "llama3", "theta"] = "off"  # how RoPE reaches past the model's window
    factor: float = 0.0  # yarn, linear, llama3: the stretch s; 0: max_seq_len / the model's max_seq_len
    max_seq_len: int = 0  # the new window; 0: factor x the model's (theta: required)
    rope_theta: float = 0.0  # a new RoPE base (theta: required, e.g. 500000 as in Xiong et al. 2023); 0: keep the model's
    beta_fast: float = float(YARN_BETA_FAST)  # yarn: pairs turning more often in the old window keep their frequency
    beta_slow: float = float(YARN_BETA_SLOW)  # yarn: pairs turning less often are interpolated by s
    low_freq_factor: float = 1.0  # llama3: wavelengths over old window / this are interpolated by s (Llama 3.1's 1)
    high_freq_factor: float = 4.0  # llama3: those under old window / this are kept (Llama 3.1's 4)


def _scaling(ext: ExtendConfig, factor: float, old_len: int, previous: dict | None) -> dict:
    """The rope_scaling dict of a scaling method, original window `old_len`."""
    if ext.method == "linear":  # positions divided by s on top of a previous division: one division by the product
        return {"rope_type": "linear", "factor": factor * (previous["factor"] if previous else 1.0)}
    if ext.method == "llama3":
        return {"rope_type": "llama3", "factor": factor, "low_freq_factor": ext.low_freq_factor,
                "high_freq_factor": ext.high_freq_factor, "original_max_position_embeddings": old_len}
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": old_len,
            "beta_fast": ext.beta_fast, "beta_slow": ext.beta_slow}


def extend_rope(cfg: ModelConfig, ext: ExtendConfig, source: str = "config") -> ModelConfig:
    """`cfg` with the extension applied: the new method's rope_scaling (its original window the model's
    max_seq_len), a new base, the new max_seq_len. A model whose RoPE is already scaled takes a new base
    on top, or a further linear stretch of a linear one; anything else is refused in one line."""
    if ext.method == "off":
        if ext != ExtendConfig():
            raise UserError(f"{source}: model.extend has settings but model.extend.method is off; set the method "
                            "(yarn, linear, llama3 or theta) or remove them")
        return cfg
    old_len = cfg.max_seq_len
    if ext.max_seq_len and ext.max_seq_len <= old_len:
        raise UserError(f"{source}: model.extend.max_seq_len={ext.max_seq_len} does not exceed the model's "
                        f"max_seq_len {old_len}; give a longer window")
    if ext.rope_theta < 0 or ext.factor < 0:
        raise UserError(f"{source}: model.extend.rope_theta and factor must be positive (0: unset)")
    if ext.method == "theta":
        if not ext.rope_theta or not ext.max_seq_len or ext.factor:
            raise UserError(f"{source}: model.extend.method=theta takes rope_theta (the new base, e.g. 500000) and "
                            "max_seq_len (the new window), and no factor")
        return dataclasses.replace(cfg, rope_theta=ext.rope_theta, max_seq_len=ext.max_seq_len).validate(source)
    previous = cfg.rope_scaling
    if previous is not None and not (ext.method == "linear" and previous["rope_type"] == "linear"):
        raise UserError(f"{source}: the model's RoPE is already scaled ({previous['rope_type']}, factor {previous['factor']}), "
                        f"and {ext.method} on top of it is not defined; use model.extend.method=theta (a new base on "
                        "top), linear on a linear model, or start from an unscaled checkpoint")
    if not ext.factor and not ext.max_seq_len:
        raise UserError(f"{source}: model.extend.method={ext.method} needs factor (e.g. 4) or max_seq_len (the new window)")
    factor = ext.factor or ext.max_seq_len / old_len
    if not factor > 1:
        raise UserError(f"{source}: model.extend.factor={factor} must exceed 1 (it stretches the window)")
    return dataclasses.replace(cfg, rope_scaling=_scaling(ext, factor, old_len, previous),
                               rope_theta=ext.rope_theta or cfg.rope_theta,
                               max_seq_len=ext.max_seq_len or round(old_len * factor)).validate(source)
