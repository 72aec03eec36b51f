"""How a mixture of experts' tokens reach their experts, set on the model by the engines (the model's
MoE layers take their `dispatch` and their experts' `kernel` as attributes, model/moe.py): the capacity
factor, and grouped GEMM or the loop over experts."""
from __future__ import annotations

from ...errors import UserError
from ...model.moe import LocalDispatch, MoE, expert_mlps, grouped_mlps, grouped_runs, looped_mlps
from .spec import EngineSpec

KERNELS = {"auto": expert_mlps, "grouped": grouped_mlps, "loop": looped_mlps}


def moe_modules(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def configure_experts(model, spec: EngineSpec) -> None:
    """Each MoE layer's dispatch (dropless or with spec.moe_capacity_factor) and its experts' kernel."""
    layers = moe_modules(model)
    if not layers:
        return
    if spec.moe_kernel == "grouped":
        if not spec.bf16 or not grouped_runs(spec.layout.device.type):
            raise UserError("moe.experts=grouped needs bf16 (train.precision bf16, or auto on a GPU) and torch._grouped_mm "
                            f"on {spec.layout.device.type}; use moe.experts=auto")
    for moe in layers:
        moe.dispatch = LocalDispatch(spec.moe_capacity_factor)
        moe.experts.kernel = KERNELS[spec.moe_kernel]

