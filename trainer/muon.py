"""Muon for the blocks' 2-D matrices, AdamW for everything else, in one optimizer.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") replaces each
matrix's momentum by its nearest semi-orthogonal matrix U V^T (five steps of a quintic
Newton-Schulz iteration) before the update. Liu et al. 2025 ("Muon is Scalable for LLM Training",
Moonlight) make it a drop-in for AdamW at scale with two changes used here: decoupled weight decay,
and scaling each matrix's update by 0.2 * sqrt(max(rows, cols)), which gives it the RMS of a typical
AdamW update (0.2-0.4), so AdamW's learning rate and weight decay carry over unchanged.

Embeddings, the output head, norms and biases are not hidden matrices (Muon's argument does not
apply to them), so their group takes AdamW's exact update (torch's own functional AdamW), with its
state under AdamW's keys.

Sharded matrices (FSDP2 DTensors, Shard(0)): each rank all-gathers the whole momentum matrix, runs
Newton-Schulz on it and keeps the rows of its own shard. In exchange for the repeated work the
update does not depend on how a matrix is sharded (it is the single-GPU update), and the only
traffic is one all-gather of each matrix per step (the bytes FSDP moves for the weights anyway). The
repeated work is 5 * (4 m^2 n + 2 m^3) FLOPs for an m x n matrix (m <= n) against 6 m n per token
trained: for a square d x d matrix about 5 d / T of the step at T tokens per step, on every rank, so
world_size * 5 d / T of each rank's step (1% on one GPU at d = 2048 and a 1M-token batch, 8% on
eight). Past one node, distributing whole matrices over the ranks (Moonlight's distributed Muon) is
the better trade.
"""
from __future__ import annotations

import math

import torch
from torch.optim.adam import adam

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan et al.: the quintic that pushes singular values into [0.7, 1.2] fastest
UPDATE_RMS = 0.2  # Liu et al.: the update RMS of AdamW that Muon's update is scaled to


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T. bf16 on GPU (the iteration is robust to it, Jordan et al.),
    fp32 on CPU where bf16 matmuls are slow."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide side: x @ x^T is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `param`: this rank's shard of it for a DTensor (no communication)."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


class Muon(torch.optim.Optimizer):
    """Groups with `muon: True` take Muon's update (2-D parameters only); the others AdamW's. Every
    group keeps the usual `lr` and `weight_decay`, so schedules, lr_scale and freezing work unchanged."""

    def __init__(self, groups, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, nesterov=True, ns_steps=5):
        defaults = dict(lr=0.0, weight_decay=0.0, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, muon=False)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups hold 2-D matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (self._muon if group["muon"] else self._adamw)(group)

    def _muon(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            direction = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            update = orthogonalize(_full(direction), group["ns_steps"])
            rows, cols = update.shape
            p.mul_(1 - lr * wd)
            p.add_(_like(update.to(p.dtype), p), alpha=-lr * UPDATE_RMS * math.sqrt(max(rows, cols)))

    def _adamw(self, group: dict) -> None:
        params, grads, avgs, sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # AdamW's own state layout (a host step counter, two moments like p)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["betas"]
            adam(params, grads, avgs, sqs, [], steps, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=False, decoupled_weight_decay=True)
