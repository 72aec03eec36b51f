"""FP8 training of the attention and MLP linears, through torchao's float8 training (Micikevicius et
al. 2022, "FP8 Formats for Deep Learning"): each chosen nn.Linear becomes a Float8Linear whose
matmuls take e4m3 inputs with dynamic scales, tensorwise (one scale per tensor, cuBLAS) or rowwise
(one per row, more accurate, CUTLASS kernels). The weights stay the model's own fp32/bf16 tensors
under their own names, so checkpoints are the usual ones: an FP8 run resumes without FP8 and
exports to HF unchanged.

Kept in bf16 by default, as torchtitan and Megatron-LM recommend: the first and last blocks (the
most sensitive to quantization), linears narrower than `train.fp8_min_features` (their casts cost
more than FP8 saves) and anything that is not a block linear (embeddings, the output head, which
the fused loss reads directly). Under FSDP2 with tensorwise scaling the sharded weights are
all-gathered in FP8 (half the bytes of bf16), their scales computed once after each step.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ...errors import UserError
from .. import collectives

RECIPES = ("tensorwise", "rowwise")
_BLOCK_LINEAR = re.compile(r"layers\.(\d+)\.(attention\.w[qkvo]|feed_forward(\.shared)?\.w[123])")  # a shared expert's too


def fp8_filter(model: nn.Module, min_features: int, keep_ends: bool):
    """The module_filter_fn of convert_to_float8_training: block linears, ends and small ones kept out."""
    n_layers = len(model.layers)

    def choose(module: nn.Module, fqn: str) -> bool:
        m = _BLOCK_LINEAR.fullmatch(fqn)
        if m is None or not isinstance(module, nn.Linear):
            return False
        if keep_ends and int(m.group(1)) in (0, n_layers - 1):
            return False
        # FP8 GEMMs need both dimensions divisible by 16.
        return min(module.in_features, module.out_features) >= min_features and module.in_features % 16 == 0 \
            and module.out_features % 16 == 0
    return choose


def fp8_config(recipe: str, fsdp_all_gather: bool, emulate: bool):
    from torchao.float8 import Float8LinearConfig

    cfg = Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "tensorwise" and fsdp_all_gather:
        cfg = Float8LinearConfig(enable_fsdp_float8_all_gather=True, emulate=emulate)
    elif emulate:
        from dataclasses import replace
        cfg = replace(cfg, emulate=True)
    return cfg


def apply_fp8(model: nn.Module, fp8, device: torch.device, fsdp: bool = False) -> list[str]:
    """Swap the chosen linears of `model` for Float8Linear in place (before sharding and compile);
    returns their names. No-op when the recipe (fp8: spec.FP8Spec) is off."""
    if fp8.recipe == "off":
        return []
    emulate = fp8.emulate
    if not emulate and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
        raise UserError(f"train.fp8={fp8.recipe} needs a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper, "
                        f"Blackwell); this run is on {device.type if device.type != 'cuda' else torch.cuda.get_device_name(device)}"
                        "; set train.fp8=off")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise UserError("train.fp8 needs torchao (pip install torchao); or set train.fp8=off") from None
    choose = fp8_filter(model, fp8.min_features, fp8.keep_ends)
    chosen = [name for name, module in model.named_modules() if choose(module, name)]
    if not chosen:
        raise UserError(f"train.fp8={fp8.recipe}: no linear qualifies (every block linear is narrower than "
                        f"train.fp8_min_features={fp8.min_features}, or the model has too few blocks with "
                        "train.fp8_keep_ends); lower the size filter or set train.fp8=off")
    convert_to_float8_training(model, module_filter_fn=choose, config=fp8_config(fp8.recipe, fsdp, emulate))
    if any(name.endswith(".experts") for name, _ in model.named_modules()) and collectives.rank() == 0:
        print(f"train.fp8={fp8.recipe}: the dense linears run in FP8; the routed experts stay in bf16 (their grouped GEMM "
              "has no FP8 form here) and so do the routers", flush=True)
    return chosen


def after_fsdp_step(model: nn.Module, fp8) -> None:
    """FP8 all-gather of tensorwise weights: their scales, computed for all of them in one pass
    after the optimizer moved them (torchao's precompute_float8_dynamic_scale_for_fsdp)."""
    if fp8.recipe == "tensorwise":
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)
