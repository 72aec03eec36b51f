"""Loss-based reweighting, online, at two levels (docs/reweighting.md):

* instance: each sample of the global batch gets a weight from its loss (Sow et al. 2025, "Dynamic
  Loss-Based Sample Reweighting for Improved LLM Pretraining", ICLR): losses are min-max normalized
  to [-delta, delta] over the batch, mapped by a strategy f (LinUpper, Quadratic, Extremes), and
  w = softmax(f / temperature). The weighted loss sum_i w_i l_i is what is backpropagated; the logged
  loss stays the plain mean so runs remain comparable.
* domain: the mixture weights follow an exponentiated-gradient rule on per-domain excess losses,
  in the spirit of DoReMi (Xie et al. 2023) and online data mixing (Albalak et al. 2023):
  w <- normalize(w * exp(eta * (L_d - ref_d))), then w <- (1 - c) w + c / K. The loader applies them
  from the next global sample on and records them in its state, so resumption stays exact.

Normalizing over the global batch (all ranks, all accumulation micro-batches) needs every sample's
loss before any backward: a no-grad forward over the step's micro-batches gives them (one extra
forward, ~1/3 of a step's compute), one all-gather of A*B floats per rank shares them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from ..errors import UserError
from .addons import AddOn, Step
from .engines.spec import autocast_for

STRATEGIES = ("linupper", "quadratic", "extremes")


@dataclass
class InstanceSection:
    strategy: Literal["none", "linupper", "quadratic", "extremes"] = "none"  # per-sample weighting (Sow et al. 2025)
    delta: float = 1.0  # losses are min-max normalized to [-delta, delta] over the global batch (paper: 1)
    temperature: float = 1.0  # r in w ~ exp(f / r): larger is closer to uniform (the paper's kl_reg: 1)
    warmup_tokens: int = 0  # plain mean loss until this many tokens are trained (paper: 1000 steps)


@dataclass
class DomainSection:
    signal: Literal["none", "train", "val"] = "none"  # per-domain loss that drives the mixture weights
    eta: float = 1.0  # step size of the exponentiated-gradient update
    smoothing: float = 0.1  # c in (1 - c) w + c / K: every domain keeps at least c / K of the mixture
    interval_tokens: int = 0  # signal=train: update every this many tokens (0: every step); val: at each evaluation
    reference: dict[str, float] = field(default_factory=dict)  # reference loss per domain; absent: its first measured loss


@dataclass
class ReweightingConfig:
    instance: InstanceSection = field(default_factory=InstanceSection)
    domain: DomainSection = field(default_factory=DomainSection)

    def check(self, cfg, src: str) -> None:
        """Bad values fail at load, before any work (cfg: the whole TrainConfig)."""
        i, d = self.instance, self.domain
        if i.delta <= 0 or i.temperature <= 0 or i.warmup_tokens < 0:
            raise UserError(f"{src}: reweighting.instance.delta and .temperature must be > 0 and warmup_tokens >= 0")
        if d.signal == "none":
            return
        names = [x.name for x in cfg.data.domains]
        if len(names) < 2:
            raise UserError(f"{src}: reweighting.domain.signal={d.signal} needs at least two data.domains to weight")
        if cfg.data.phases:
            raise UserError(f"{src}: reweighting.domain and data.phases both set the mixture weights; remove one")
        if not 0 <= d.smoothing <= 1 or d.eta < 0 or d.interval_tokens < 0:
            raise UserError(f"{src}: reweighting.domain.smoothing must be in [0, 1], eta >= 0 and interval_tokens >= 0")
        unknown = sorted(set(d.reference) - set(names))
        if unknown:
            raise UserError(f"{src}: reweighting.domain.reference names unknown domains {unknown}; use {names}")
        if d.signal == "val" and cfg.eval.interval_tokens <= 0:
            raise UserError(f"{src}: reweighting.domain.signal=val updates at evaluations; set eval.interval_tokens > 0")


# ---------------------------------------------------------------- instance weights

def sample_weights(losses: torch.Tensor, strategy: str, delta: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """Weights (summing to 1) of the samples of one global batch, from their mean losses [N]."""
    lo, hi = losses.min(), losses.max()
    h = 2 * delta * (losses - lo) / (hi - lo).clamp(min=1e-6) - delta  # in [-delta, delta]
    if strategy == "linupper":  # rises with the loss up to the batch's mid-range, then flat
        f = torch.minimum(h + delta, torch.full_like(h, delta))
    elif strategy == "quadratic":  # favours the middle: both very easy and very hard samples count less
        f = 1 - h * h / (delta * delta)
    elif strategy == "extremes":  # favours both ends
        f = h.abs()
    else:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    g = torch.exp((f - f.max()) / temperature)  # shifted by the max: exp never overflows
    return g / g.sum()


def global_losses(local: torch.Tensor) -> torch.Tensor:
    """[A, B] sample losses of this rank's micro-batches -> [A * W * B] in global sample order:
    micro-batch j of rank r holds global samples (j*W + r)*B ... (data_pipeline/loader.py), so the
    vector, and the weights computed from it, are the same whatever the split into ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local.reshape(-1)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.stack(parts, dim=1).reshape(-1)  # [A, W, B]


def attach_sample_weights(engine, batches: list[dict], cfg: InstanceSection, chunk_tokens: int, autocast) -> dict:
    """Sets batch['sample_weight'] ([B] multipliers, mean 1 over the global batch: what lm_loss
    scales each sample's loss by) on this rank's micro-batches of a step; returns stats to log."""
    from .loss import token_losses

    with torch.no_grad(), autocast():
        local = torch.stack([token_losses(engine.model, b, chunk_tokens).mean(dim=1) for b in batches])  # [A, B]
    losses = global_losses(local.float()).double()
    w = sample_weights(losses, cfg.strategy, cfg.delta, cfg.temperature)
    n, world = w.numel(), (dist.get_world_size() if dist.is_initialized() else 1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = w.view(len(batches), world, -1)[:, rank] * n  # [A, B]
    for b, m in zip(batches, mine):
        b["sample_weight"] = m.float()
    return {"reweight/weighted_loss": float((w * losses).sum()), "reweight/max_weight": float(w.max() * n),
            "reweight/ess": float(1.0 / (w * w).sum() / n)}  # effective sample size, as a fraction of N


# ---------------------------------------------------------------- domain weights

def eg_update(weights: np.ndarray, excess: np.ndarray, eta: float, smoothing: float) -> np.ndarray:
    """One exponentiated-gradient step on the simplex, then the smoothing floor (DoReMi, eq. 1)."""
    logits = np.log(weights) + eta * excess
    w = np.exp(logits - logits.max())
    w /= w.sum()
    return (1 - smoothing) * w + smoothing / len(w)


class DomainWeights:
    """Online mixture weights over the training domains; everything it needs to continue a run
    exactly is in state_dict() (saved in the checkpoint's progress)."""

    def __init__(self, cfg: DomainSection, names: list[str], initial: list[float], state: dict | None):
        self.cfg, self.names = cfg, names
        state = state or {}
        w = np.array(initial, dtype=np.float64)
        # Saved weights are taken as they are: normalizing them again would change their last bits.
        self.weights = np.array(state["weights"], dtype=np.float64) if "weights" in state else w / w.sum()
        self.reference = {**state.get("reference", {}), **cfg.reference}
        self.last = dict(state.get("last", {}))  # newest measured loss per domain
        self.sums = np.array(state.get("sums", [0.0] * len(names)), dtype=np.float64)
        self.counts = np.array(state.get("counts", [0.0] * len(names)), dtype=np.float64)
        self.updates = int(state.get("updates", 0))

    def observe_train(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """A step's per-domain sums of sample losses and sample counts (already summed over ranks)."""
        self.sums += sums.double().cpu().numpy()
        self.counts += counts.double().cpu().numpy()

    def due(self, before: int, after: int, row: dict, step_tokens: int) -> bool:
        if self.cfg.signal == "val":
            return all(f"val/{n}" in row for n in self.names)
        interval = self.cfg.interval_tokens or step_tokens
        return before // interval != after // interval

    def update(self, row: dict) -> dict[str, float]:
        """New weights from the losses since the last update; returns them as metrics."""
        if self.cfg.signal == "val":
            measured = {n: row[f"val/{n}"] for n in self.names}
        else:
            measured = {n: s / c for n, s, c in zip(self.names, self.sums, self.counts) if c > 0}
            self.sums[:], self.counts[:] = 0.0, 0.0
        measured = {n: v for n, v in measured.items() if math.isfinite(v)}  # a NaN step (trainer/faults.py) moves nothing
        self.last.update(measured)
        for n, loss in measured.items():
            self.reference.setdefault(n, loss)  # the first measurement is the reference
        excess = np.array([self.last[n] - self.reference[n] if n in self.last else 0.0 for n in self.names])
        self.weights = eg_update(self.weights, excess, self.cfg.eta, self.cfg.smoothing)
        self.updates += 1
        return {f"domain_weight/{n}": float(w) for n, w in zip(self.names, self.weights)}

    def state_dict(self) -> dict:
        return {"weights": self.weights.tolist(), "reference": dict(self.reference), "last": dict(self.last),
                "sums": self.sums.tolist(), "counts": self.counts.tolist(), "updates": self.updates}


# ---------------------------------------------------------------- what the loop calls

class Reweighter(AddOn):
    """The loop's hooks: sample weights before a step's backward, domain weights after a step."""
    name = "reweighting"

    def __init__(self, cfg, engine, loader, val_loaders: dict):
        self.icfg, self.step_tokens = cfg.reweighting.instance, cfg.train.global_batch_tokens
        self.chunk, self.engine, self.loader = cfg.train.loss_chunk_tokens, engine, loader
        self.dcfg, self.data_domains = cfg.reweighting.domain, cfg.data.domains
        if self.dcfg.signal == "val":
            missing = [d.name for d in self.data_domains if d.name not in val_loaders]
            if missing:
                raise UserError(f"reweighting.domain.signal=val: domains {missing} have no validation samples; "
                                "prepare them with --val-fraction > 0 or use signal=train")
        self.load_state_dict({})

    def load_state_dict(self, state: dict) -> None:
        self.domains = None
        if self.dcfg.signal != "none":
            override = (self.loader.state_dict().get("weights_override") or {}).get("weights", {})
            initial = [override.get(d.name, d.weight) for d in self.data_domains]
            self.domains = DomainWeights(self.dcfg, [d.name for d in self.data_domains], initial, state.get("domain"))

    def before_step(self, batches: list[dict], tokens: int) -> dict:
        """Attaches sample weights to the step's micro-batches once the warmup is over."""
        if self.icfg.strategy == "none" or tokens < self.icfg.warmup_tokens:
            return {}
        layout = self.engine.spec.layout
        return attach_sample_weights(self.engine, batches, self.icfg, self.chunk,
                                     lambda: autocast_for(layout.device, self.engine.spec.bf16))

    def after_update(self, step: Step) -> dict:
        if self.domains is not None and self.domains.cfg.signal == "train":
            n = len(self.domains.names)
            self.domains.observe_train(step.domain_loss_sums[:n], step.domain_counts[:n])
        return {}

    def after_step(self, step: Step, row: dict) -> dict:
        """Updates and applies the mixture weights when due (on every rank alike: the losses are
        global); returns `domain_weight/<name>` metrics on updates."""
        if self.domains is None or not self.domains.due(step.before, step.after, row, self.step_tokens):
            return {}
        logged = self.domains.update(row)
        self.loader.set_weights({n: float(w) for n, w in zip(self.domains.names, self.domains.weights)})
        return logged

    def state_dict(self) -> dict:
        return {"domain": self.domains.state_dict()} if self.domains is not None else {}
