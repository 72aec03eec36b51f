"""The mixture-of-experts feed-forward (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2021): a
router sends each token to its top-k of E experts, each a gated MLP (model/mlp.py), and sums their
outputs weighted by the router's probabilities (renormalized over the top k where the family does);
an optional shared expert (Qwen2-MoE) sees every token. One more feed-forward of the block.

Tokens are sorted to their experts and back by index operations (a stable argsort, counts per expert,
index copies), never a Python loop over tokens. The experts run over a buffer in which each one's tokens are
contiguous, each group padded to a multiple of ALIGN rows: one grouped GEMM per projection
(`torch._grouped_mm`, bf16), or a loop over the experts (the reference, and the fp32 path). Buffer
sizes depend only on the number of tokens, so a compiled block sees static shapes.

Dropless by default. With a capacity factor c (Switch Transformer) an expert takes at most
ceil(c * T * k / E) of the T * k assignments, first come first served in token order; the rest are
dropped (they add nothing to the token's output) and counted.

How tokens reach their experts is a pluggable `dispatch` (an attribute, as attention's kernels are):
`LocalDispatch` runs every expert in this process; an engine may put an expert-parallel one in its
place (trainer/engines/experts.py), reusing group_by_expert / run_experts / combine. The model holds
no distributed code.

Each MoE layer returns, beside its output, its router statistics as one small vector (pack_stats),
which the decoder stacks (Decoder.hidden(aux=...)); router_losses turns them into the load-balancing
loss exactly as transformers' load_balancing_loss_func computes it for all four families, and the
router z-loss (Zoph et al. 2022, ST-MoE).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .mlp import FeedForward, gated

# Each expert's rows start at a multiple of 8: 16 bytes of bf16, the alignment grouped GEMM kernels need
# for every group (the weight gradient's groups split the token dimension).
ALIGN = 8
N_SCALARS = 4  # pack_stats: z_sum, entropy_sum, dropped, tokens after the two per-expert vectors


def route(logits: torch.Tensor, top_k: int, norm_topk: bool, bias: torch.Tensor | None = None,
          score: str = "softmax") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, chosen experts [T, k] int64, probs [T, E] float32).
    softmax: in float32, top-k, optionally renormalized, as transformers' routers. sigmoid (DeepSeek-V3,
    eq. 15-16): each expert's score sigmoid(logit), the top-k scores as weights (renormalized with
    norm_topk, as DeepSeek-V3 does); probs are then the scores normalized over the experts (its
    balancing loss's s', eq. 18). `bias` [E] (auxiliary-loss-free balancing, DeepSeek-V3) is added to
    the scores for the selection only."""
    if score == "sigmoid":
        scores = torch.sigmoid(logits.float())
        probs = scores / scores.sum(dim=-1, keepdim=True)
    else:
        scores = probs = torch.softmax(logits.float(), dim=-1)
    chosen = torch.topk(scores if bias is None else scores + bias, top_k, dim=-1).indices
    weights = scores.gather(1, chosen)
    if norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, chosen, probs


def capacity(factor: float, assignments: int, n_experts: int) -> int | None:
    """Assignments an expert takes at most (Switch Transformer's expert capacity); None: dropless."""
    return None if factor <= 0 else max(1, math.ceil(factor * assignments / n_experts))


@dataclass
class Groups:
    """Rows sorted by expert and placed in the expert buffer (group_by_expert)."""
    order: torch.Tensor  # [N] row indices sorted by expert (stable: token order within an expert)
    dest: torch.Tensor  # [N] buffer row of each sorted row; a dropped one's is the last row, past every group
    keep: torch.Tensor  # [N] bool: within its expert's capacity
    offsets: torch.Tensor  # [E] int32: where each expert's (padded) rows end in the buffer
    rows: int  # the buffer's rows, a function of N, E and the capacity only
    counts: torch.Tensor  # [E] rows of each expert, before the capacity (the router statistics count these)
    kept: torch.Tensor  # [E] rows of each expert within its capacity (what an expert-parallel dispatch sends)
    dropped: torch.Tensor  # () rows over capacity


def expert_counts(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Rows per expert [E] of `expert_ids` (all < n_experts). bincount's output length depends on the
    data, which breaks torch.compile's graph in every MoE layer; a scatter-add into E slots does not."""
    return expert_ids.new_zeros(n_experts).scatter_add_(0, expert_ids, torch.ones_like(expert_ids))


def group_by_expert(expert_ids: torch.Tensor, n_experts: int, cap: int | None = None) -> Groups:
    """Place N rows, whose experts are `expert_ids` [N], in a buffer where each expert's rows are
    contiguous (ALIGN-padded, in expert order), at most `cap` of them an expert."""
    n = expert_ids.numel()
    order = torch.argsort(expert_ids, stable=True)
    counts = expert_counts(expert_ids, n_experts)  # [E]
    experts = expert_ids[order]
    rank = torch.arange(n, device=expert_ids.device) - (counts.cumsum(0) - counts)[experts]  # place in its expert
    kept = counts if cap is None else counts.clamp(max=cap)
    keep = rank < (n if cap is None else cap)
    padded = (kept + ALIGN - 1) // ALIGN * ALIGN
    ends = padded.cumsum(0)
    rows = (n if cap is None else min(n, n_experts * cap)) + n_experts * (ALIGN - 1) + 1
    dest = torch.where(keep, (ends - padded)[experts] + rank, rows - 1)
    return Groups(order, dest, keep, ends.to(torch.int32), rows, counts, kept, (~keep).sum())


def run_experts(rows: torch.Tensor, groups: Groups, experts: "Experts") -> torch.Tensor:
    """rows [N, D] in sorted order -> the experts' outputs [N, D] in the same order; dropped rows give 0
    (selected by `where`, so whatever the kernel leaves past the groups never reaches a value or gradient)."""
    keep = groups.keep[:, None]
    buffer = rows.new_zeros(groups.rows, rows.shape[1]).index_put((groups.dest,), torch.where(keep, rows, 0))
    return torch.where(keep, experts(buffer, groups.offsets)[groups.dest], 0)


def combine(sorted_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The experts' outputs [N, D] of the assignments `order` [N] (indices into the T*k, a permutation or a
    subset) -> each token's weighted sum [T, D]; an assignment not in `order` adds nothing."""
    t, k = weights.shape
    out = sorted_out.new_zeros(t * k, sorted_out.shape[1]).index_copy(0, order, sorted_out)  # (token, k) order
    return (out.view(t, k, -1) * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)


class LocalDispatch:
    """Every expert in this process; `capacity_factor` 0 is dropless."""

    def __init__(self, capacity_factor: float = 0.0):
        self.capacity_factor = capacity_factor

    def __call__(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor,
                 experts: "Experts") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D], chosen and weights [T, k] -> (output [T, D], assignments per expert [E], assignments dropped)."""
        t, k = chosen.shape
        groups = group_by_expert(chosen.flatten(), experts.n_experts, capacity(self.capacity_factor, t * k, experts.n_experts))
        out = run_experts(x[groups.order // k], groups, experts)
        return combine(out, groups.order, weights), groups.counts, groups.dropped


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's when it is on, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


@functools.cache
def grouped_runs(device_type: str) -> bool:
    """torch._grouped_mm exists and runs on this device type in bf16 (CUDA: torch >= 2.8, its fast kernels
    on Hopper and later; CPU: recent releases only, so it is tried once)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device_type == "cuda":
        return True
    try:
        a = torch.zeros(ALIGN, ALIGN, dtype=torch.bfloat16, device=device_type)
        torch._grouped_mm(a, a[None].transpose(-2, -1), offs=torch.tensor([ALIGN], dtype=torch.int32, device=device_type))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def can_group(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """Grouped GEMM takes bf16 only (its compiled form too), rows whose strides are 16-byte multiples."""
    return compute_dtype(x) == torch.bfloat16 and x.shape[-1] % ALIGN == 0 and w1.shape[1] % ALIGN == 0 \
        and grouped_runs(x.device.type)


def grouped_mlps(x, offsets, w1, w3, w2, gate, gelu: bool) -> torch.Tensor:
    """The experts' gated MLPs over buffer x [M, D] as three grouped GEMMs (bf16); rows past offsets[-1]
    are left undefined (run_experts never reads them)."""
    dtype = compute_dtype(x)

    def mm(a, w):  # a [M, in] @ each expert's w[e] [out, in] transposed, over its group of rows
        return torch._grouped_mm(a.to(dtype), w.to(dtype).transpose(-2, -1), offs=offsets)
    return mm(gate(mm(x, w1), mm(x, w3), gelu), w2)


def looped_mlps(x, offsets, w1, w3, w2, gate, gelu: bool) -> torch.Tensor:
    """The same, one expert at a time (any dtype: the reference of grouped_mlps)."""
    out = x.new_zeros(x.shape[0], w2.shape[1], dtype=compute_dtype(x))
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            h = x[start:end]
            out[start:end] = F.linear(gate(F.linear(h, w1[e]), F.linear(h, w3[e]), gelu), w2[e])
        start = end
    return out


def expert_mlps(x, offsets, w1, w3, w2, gate, gelu: bool) -> torch.Tensor:
    """Grouped GEMM where it runs (can_group), else the loop."""
    return (grouped_mlps if can_group(x, w1) else looped_mlps)(x, offsets, w1, w3, w2, gate, gelu)


class Experts(nn.Module):
    """E gated MLPs as three tensors [E, out, in] (a stack of nn.Linear weights: checkpoints split and
    stack them per expert). forward takes a buffer [M, D] of rows grouped by expert and the ends of the
    groups; `kernel` (expert_mlps, grouped_mlps or looped_mlps) is swappable, as attention's kernels are."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, f, d = cfg.n_experts, cfg.moe_ffn_dim, cfg.dim
        self.n_experts = e
        self.w1 = nn.Parameter(torch.empty(e, f, d))  # gate
        self.w3 = nn.Parameter(torch.empty(e, f, d))  # up
        self.w2 = nn.Parameter(torch.empty(e, d, f))  # down
        self.gelu, self.gate, self.kernel = cfg.activation == "gelu_tanh", gated, expert_mlps

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, offsets, self.w1, self.w3, self.w2, self.gate, self.gelu)


class MoE(nn.Module):
    """Router (`router`, a [E, D] linear), experts, an optional sigmoid-gated shared expert (Qwen2-MoE).
    forward(x [B, S, D]) -> (output [B, S, D], router statistics [2E + 4] (pack_stats))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk, self.score = cfg.moe_top_k, cfg.moe_norm_topk, cfg.moe_router
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = Experts(cfg)
        shared = cfg.moe_shared_ffn_dim > 0
        self.shared = FeedForward(cfg, cfg.moe_shared_ffn_dim) if shared else None
        self.shared_gate = nn.Linear(cfg.dim, 1, bias=False) if shared else None
        self.dispatch = LocalDispatch()  # how tokens reach the experts (an engine may set another)
        # [E] added to the scores for selection only (auxiliary-loss-free balancing, trainer/moe.py); training
        # state kept by the trainer, not a weight of the family's checkpoints.
        self.selection_bias: torch.Tensor | None = None

    def mlps(self) -> list[nn.Module]:
        """The modules holding w1, w3, w2 (experts, shared expert), for initialization."""
        return [self.experts] + ([self.shared] if self.shared is not None else [])

    @torch.no_grad()
    def init_router(self, std: float) -> None:
        for lin in (self.router, self.shared_gate):
            if lin is not None:
                nn.init.normal_(lin.weight, 0.0, std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, x.shape[-1])  # [T, D]
        logits = self.router(flat)  # [T, E]
        weights, chosen, probs = route(logits, self.top_k, self.norm_topk, self.selection_bias, self.score)
        out, counts, dropped = self.dispatch(flat, chosen, weights, self.experts)
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(flat)) * self.shared(flat)
        return out.view(x.shape), pack_stats(logits, probs, counts, dropped)


def pack_stats(logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """One layer's router statistics as one vector [2E + 4] (a block output every engine's hooks pass
    through): the summed probabilities [E] and summed squared log-partition (z) with their gradient,
    then, without, the assignments per expert [E] (`counts`, the dispatch's), the summed entropy, the
    dropped assignments, the tokens."""
    z = torch.logsumexp(logits.float(), dim=-1).square().sum()
    with torch.no_grad():
        scalars = torch.stack([torch.special.entr(probs).sum(), dropped.to(probs.dtype), probs.new_tensor(probs.shape[0])])
    return torch.cat([probs.sum(dim=0), z[None], counts.to(probs.dtype), scalars])


def unpack_stats(stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """pack_stats of L layers [L, 2E + 4] (or sums of them) -> named [L, E] and [L] tensors."""
    e = (stats.shape[-1] - N_SCALARS) // 2
    return {"prob_sum": stats[..., :e], "z_sum": stats[..., e], "counts": stats[..., e + 1:2 * e + 1],
            "entropy_sum": stats[..., 2 * e + 1], "dropped": stats[..., 2 * e + 2], "tokens": stats[..., 2 * e + 3]}


def moe_layers(model) -> list["MoE"]:
    """The model's MoE layers, in layer order (whatever wraps the model)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def balance_loss(counts: torch.Tensor, prob_sum: torch.Tensor, tokens) -> torch.Tensor:
    """E * sum_i f_i P_i over the last (expert) dimension, f_i and P_i the shares of assignments and the
    mean router probabilities of `tokens` tokens (Switch Transformer eq. 4-6)."""
    return counts.shape[-1] * ((counts / tokens) * (prob_sum / tokens)).sum(-1)


def router_losses(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss) of stacked layer statistics [L, 2E + 4], with their gradients.

    Balancing: transformers' load_balancing_loss_func (Switch Transformer eq. 4-6) as every MoE family there
    defines it: E * sum_i f_i P_i, with f_i the fraction of the top-k assignments and P_i the mean router
    probability of expert i, both pooled over all MoE layers' tokens (not a mean of per-layer losses).
    z-loss (ST-MoE eq. 5): the mean over tokens and layers of logsumexp(logits)^2."""
    s = unpack_stats(stats)
    total = s["tokens"].sum()
    return balance_loss(s["counts"].sum(0), s["prob_sum"].sum(0), total), s["z_sum"].sum() / total
