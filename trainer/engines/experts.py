"""How a mixture of experts' tokens reach their experts, set on the model by the engines (the model's
MoE layers take their `dispatch` and their experts' `kernel` as attributes, model/moe.py): the capacity
factor, grouped GEMM or the loop over experts, and expert parallelism (ExpertParallelDispatch and
shard_experts, for FSDP2: experts split over the layout's `ep` ranks, tokens exchanged by all-to-all)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ...errors import UserError
from ...model.moe import (LocalDispatch, capacity, combine, expert_mlps, group_by_expert, grouped_mlps, grouped_runs, moe_layers,
                          looped_mlps, run_experts)
from .layout import Layout
from .spec import EngineSpec

KERNELS = {"auto": expert_mlps, "grouped": grouped_mlps, "loop": looped_mlps}


def configure_experts(model, spec: EngineSpec) -> None:
    """Each MoE layer's dispatch (dropless or with spec.moe_capacity_factor; all-to-all over the `ep` ranks
    when the layout splits the experts) and its experts' kernel."""
    layers = moe_layers(model)
    if not layers:
        return
    layout = spec.layout
    if spec.moe_kernel == "grouped" and not (spec.bf16 and grouped_runs(layout.device.type)):
        raise UserError("moe.experts=grouped needs bf16 (train.precision bf16, or auto on a GPU) and torch._grouped_mm "
                        f"on {layout.device.type}; use moe.experts=auto")
    for moe in layers:
        moe.dispatch = (ExpertParallelDispatch(layout.group("ep"), layout.ep, moe.experts.n_experts, spec.moe_capacity_factor)
                        if layout.ep > 1 else LocalDispatch(spec.moe_capacity_factor))
        moe.experts.kernel = KERNELS[spec.moe_kernel]


class ExpertParallelDispatch:
    """Experts split over the `ep` ranks of `group`: rank r holds experts [r * E/ep, (r + 1) * E/ep). Each
    rank sorts its assignments to experts (its capacity applied there: only kept rows travel), tells every
    rank how many rows it sends for each of its experts, sends them with one all-to-all, runs its own
    experts on what it received (grouped by expert as model/moe.py does locally), and returns the outputs
    with the reverse all-to-all. Both exchanges are autograd functions: backward is the reverse exchange.
    The row counts set the exchange sizes (a host sync, as every all-to-all dispatch needs)."""

    def __init__(self, group, ep: int, n_experts: int, capacity_factor: float = 0.0):
        self.group, self.ep, self.n_local, self.capacity_factor = group, ep, n_experts // ep, capacity_factor

    def __call__(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor,
                 experts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from torch.distributed.nn.functional import all_to_all_single

        t, k = chosen.shape
        n_experts = self.n_local * self.ep
        groups = group_by_expert(chosen.flatten(), n_experts, capacity(self.capacity_factor, t * k, n_experts))
        sent = groups.order[groups.keep]  # the kept assignments, by expert, so by the rank that owns it
        received = torch.empty_like(groups.kept)  # [ep * E/ep]: from each rank, its rows for each of this rank's experts
        dist.all_to_all_single(received, groups.kept, group=self.group)
        send_sizes = groups.kept.view(self.ep, self.n_local).sum(dim=1).tolist()
        recv_sizes = received.view(self.ep, self.n_local).sum(dim=1).tolist()
        rows = all_to_all_single(x.new_empty(sum(recv_sizes), x.shape[1]), x[sent // k], recv_sizes, send_sizes, self.group)
        local = torch.arange(self.n_local, device=x.device).repeat(self.ep).repeat_interleave(received)  # each row's expert
        inner = group_by_expert(local, self.n_local)
        out = run_experts(rows[inner.order], inner, experts)
        out = torch.empty_like(out).index_copy(0, inner.order, out)  # back to the order received
        back = all_to_all_single(out.new_empty(len(sent), out.shape[1]), out, send_sizes, recv_sizes, self.group)
        return combine(back, sent, weights), groups.counts, groups.dropped


def _local_weights(kernel):
    """The experts' kernel on this rank's slice of each [E, out, in] tensor (a DTensor sharded over `ep`)."""
    def run(x, offsets, w1, w3, w2, gate, gelu):
        return kernel(x, offsets, w1.to_local(), w3.to_local(), w2.to_local(), gate, gelu)
    return run


def shard_experts(model, layout: Layout, fsdp_kwargs: dict) -> None:
    """Expert parallelism under FSDP2 (before the blocks are sharded, on the meta model): each MoE layer's
    expert tensors become DTensors split on the expert dimension over the layout's `ep` mesh dimension,
    and the experts one FSDP unit over `dp_out` (the data-parallel ranks that hold the same experts), as
    torchtitan does. Their gradients are reduced over dp_out only (the all-to-all already summed the other
    ranks' tokens into them), then divided by the whole data-parallel size as every other gradient is."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = layout.mesh()
    for moe in moe_layers(model):
        experts = moe.experts
        for name in ("w1", "w3", "w2"):
            experts.register_parameter(name, nn.Parameter(distribute_tensor(getattr(experts, name), mesh["ep"], [Shard(0)])))
        experts.kernel = _local_weights(experts.kernel)
        fully_shard(experts, mesh=mesh["dp_out"], **fsdp_kwargs)
        experts.set_gradient_divide_factor(float(layout.dp_size))
        if layout.device.type == "cpu" and layout.dp_size // layout.ep > 1:
            experts.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum: divide after the reduction
