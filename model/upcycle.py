"""Upcycling a dense model into a mixture of experts (Komatsuzaki et al. 2022, "Sparse Upcycling"): every
expert of a layer is a copy of its MLP, the router is new; with Drop-Upcycling (Nakamura et al. 2025) a
fraction r of each expert's intermediate units (the rows of w1 and w3, the columns of w2 they feed) is
re-initialized from the normal distribution with the mean and standard deviation of the original
matrix, a different sample of units per expert, so the experts start apart and specialize sooner.

At r = 0 the mixture computes the dense model's function: its top-k weights are renormalized to sum to
one (Mixtral always, Qwen3-MoE with norm_topk_prob), over experts that are all the same MLP, so
sum_k w_k MLP(x) = MLP(x) whatever the router picks.
"""
from __future__ import annotations

import dataclasses

import torch

from ..errors import UserError
from .config import ModelConfig
from .families import FAMILIES

# The mixture-of-experts family of a dense family's block: the same attention, norms and MLP.
MOE_OF = {"llama": "mixtral", "mistral": "mixtral", "qwen3": "qwen3_moe"}
# A target without a shared expert whose top-k weights can sum to one (upcycle's r = 0 guarantee).
TARGETS = ("mixtral", "qwen3_moe")


def upcycled_config(cfg: ModelConfig, n_experts: int, top_k: int, family: str | None = None) -> ModelConfig:
    """The MoE config of a dense `cfg`: its block, every MLP a layer of `n_experts` experts of its width."""
    family = family or MOE_OF.get(cfg.family)
    if family not in TARGETS:
        raise UserError(f"cannot upcycle a {cfg.family} model into {family or 'a mixture of experts'}: pass --family "
                        f"{' or '.join(TARGETS)} (the family whose block is the dense model's)")
    if cfg.n_experts:
        raise UserError(f"the model is already a mixture of experts ({cfg.family}, {cfg.n_experts} experts)")
    if not 0 < top_k <= n_experts:
        raise UserError(f"--top-k {top_k} must be between 1 and --experts {n_experts}")
    moe = dataclasses.replace(cfg, family=family, n_experts=n_experts, moe_top_k=top_k, moe_ffn_dim=cfg.ffn_dim,
                              moe_norm_topk=True, moe_aux_loss_coef=FAMILIES[family].defaults["router_aux_loss_coef"])
    return moe.validate(f"cannot upcycle this {cfg.family} model into {family}")


def upcycle(cfg: ModelConfig, state: dict[str, torch.Tensor], n_experts: int, top_k: int, drop_fraction: float = 0.0,
            family: str | None = None, seed: int = 0) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(MoE config, its state dict) from a dense model's: each layer's experts copied from its MLP (with
    Drop-Upcycling's re-initialization of `drop_fraction` of each expert's units), its router drawn from
    N(0, init_std), every other tensor unchanged. Deterministic given `seed`."""
    if not 0.0 <= drop_fraction <= 1.0:
        raise UserError(f"--drop-fraction {drop_fraction} must be between 0 and 1 (Drop-Upcycling uses 0.5)")
    moe = upcycled_config(cfg, n_experts, top_k, family)
    g = torch.Generator().manual_seed(seed)
    out = {k: v for k, v in state.items() if ".feed_forward." not in k}
    dropped = round(drop_fraction * cfg.ffn_dim)
    for i in range(cfg.n_layers):
        prefix = f"layers.{i}.feed_forward"
        dense = {w: state[f"{prefix}.{w}.weight"] for w in ("w1", "w3", "w2")}  # [F, D], [F, D], [D, F]
        experts = {w: t.expand(n_experts, *t.shape).clone() for w, t in dense.items()}
        for e in range(n_experts if dropped else 0):
            units = torch.randperm(cfg.ffn_dim, generator=g)[:dropped]  # the same units of w1, w3 and w2
            experts["w1"][e, units] = _redraw(dense["w1"], (dropped, cfg.dim), g)
            experts["w3"][e, units] = _redraw(dense["w3"], (dropped, cfg.dim), g)
            experts["w2"][e, :, units] = _redraw(dense["w2"], (cfg.dim, dropped), g)
        out.update({f"{prefix}.experts.{w}": t for w, t in experts.items()})
        out[f"{prefix}.router.weight"] = (torch.randn(n_experts, cfg.dim, generator=g) * cfg.init_std).to(dense["w1"].dtype)
    return moe, out


def _redraw(w: torch.Tensor, shape: tuple, g: torch.Generator) -> torch.Tensor:
    """Fresh values from N(mean, std^2) of the original matrix w (Drop-Upcycling's statistical re-initialization)."""
    w32 = w.float()
    return (torch.randn(shape, generator=g) * w32.std() + w32.mean()).to(w.dtype)
