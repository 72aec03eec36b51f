"""The CPT law (Wang, Tissue et al. 2025, "Learning Dynamics in Continual Pre-Training for Large
Language Models", ICML; arXiv:2505.07796): the validation loss of each domain at every step of a
continual-pretraining run, for any LR schedule and replay ratio.

A CPT loss curve moves from the hidden pretraining curve of the old data towards that of the new
data. It is the LR-annealing law of Tissue et al. 2024 over the whole LR history (Eq. 2) plus a
distribution-shift term in the forward area S1cpt spent on the new data (Eq. 3), with the replay
ratio entering both (Eq. 8, their Appendix H):

    L = L0 + A (S1pt + S1cpt)^-alpha - C1 S2pt - C2 S2cpt g1(r) + B (1 - (1 + E S1cpt)^-beta) g2(r)

    old domain (D_pt):  g1 = exp(a1 r_pt),   g2 = 1 - exp(-a2 r_cpt)
    new domain (D_cpt): g1 = exp(a1 r_cpt),  g2 = exp(a2 r_cpt) - 1

r_pt is the replay fraction (old data in the CPT mixture), r_cpt = 1 - r_pt. S1 is the summed LR
(warmup included), S2 the momentum-smoothed sum of LR drops (decay 0.999, rewarm rises count as
negative drops, as in `curves.tissue_s2`); the pt/cpt parts are the sums over the steps of each
phase, the momentum carried from pretraining into the CPT. B > 0 on the old domain (the loss rises),
B < 0 on the new one. With a single replay ratio among the runs g1 = g2 = 1 (their Eq. 4).

An unknown pretraining (an HF model, Sec. 6 and App. G of the paper): S1pt is fitted, its LR taken
as annealed to 0 and its momentum as spent, so C1 S2pt is a constant that L0 absorbs. C1 is fitted
only where the pretraining's own evaluations of a domain are in the fit (S2pt varies there).

Fitting as the paper does it (App. C): Huber loss between predicted and observed log loss, summed
over every point, minimized by L-BFGS (scipy) from a range of initial conditions. The paper gives no
grid, no Huber delta and no bounds: we take Chinchilla's delta (1e-3, the method they follow), a
grid over the nonlinear parameters with the linear ones (L0, A, C1, C2, B) solved by least squares
at each grid point, and the paper's signs (L0, A, alpha, C, E, beta > 0; a1, a2 >= 0 from App. H's
trends) as L-BFGS-B bounds.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.signal import lfilter

from ....errors import UserError
from .curves import TISSUE_DECAY
from .laws import batched_lbfgs, huber, polish

NAMES = ("L0", "A", "alpha", "C1", "C2", "B", "E", "beta", "a1", "a2", "S1pt")
LOG_SPACE = ("A", "E", "S1pt")  # fitted as logs: positive, scale-free
LINEAR = ("L0", "A", "C1", "C2", "B")  # solved by least squares at each grid point (the starts)
BOUNDS = {"alpha": (0.0, 10.0), "C1": (0.0, math.inf), "C2": (0.0, math.inf), "beta": (1e-4, 10.0),
          "a1": (0.0, 20.0), "a2": (1e-3, 20.0)}
STARTS = 8  # grid points (after screening) that L-BFGS starts from


@dataclass(frozen=True)
class Transfer:
    """The pretraining a CPT starts from, summed up (Wang et al. 2025, Eq. 2)."""
    s1: float  # its forward area S1pt (unknown pretraining: 0, S1pt is fitted)
    s2: float  # its annealing area S2pt
    momentum: float  # the annealing momentum at its last step, carried into the CPT
    lr: float  # its last LR: the first CPT drop is measured from it
    steps: int  # its length in steps
    known: bool  # False: an unknown pretraining (S1pt fitted, LR annealed to 0)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("s1", "s2", "momentum", "lr", "steps", "known")}


UNKNOWN = Transfer(0.0, 0.0, 0.0, 0.0, 0, False)


def _momentum(lr: np.ndarray, first: float, m0: float) -> np.ndarray:
    """m_i = lam m_{i-1} + (lr[i-1] - lr[i]) for i = 1..len(lr)-1, with lr[0] replaced by `first`
    (the LR before the first step) and m_0 = m0."""
    prev = np.concatenate([[first], lr[1:-1]])
    return lfilter([1.0], [1.0, -TISSUE_DECAY], prev - lr[1:], zi=[TISSUE_DECAY * m0])[0]


def pretrain_areas(lr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S1, S2, m) at every pretraining step 0..T of the LR per step `lr` (lr[0] = 0: no step)."""
    m = np.concatenate([[0.0], _momentum(lr, lr[0], 0.0)])
    return np.cumsum(lr), np.cumsum(m), m


def transfer_of(lr: np.ndarray) -> Transfer:
    s1, s2, m = pretrain_areas(lr)
    return Transfer(float(s1[-1]), float(s2[-1]), float(m[-1]), float(lr[-1]), len(lr) - 1, True)


def cpt_areas(tr: Transfer, lr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S1cpt, S2cpt) at every CPT step 0..T of the LR per CPT step `lr` (lr[0] unused: no step)."""
    m = _momentum(lr, tr.lr, tr.momentum)
    zero = np.zeros(1)
    return np.concatenate([zero, np.cumsum(lr[1:])]), np.concatenate([zero, np.cumsum(m)])


@dataclass
class Points:
    """One domain's observations and the areas at each (float64 arrays [M])."""
    loss: np.ndarray
    s1: np.ndarray  # the known part of S1pt (pretraining points: the area so far)
    s1cpt: np.ndarray
    s2pt: np.ndarray
    s2cpt: np.ndarray
    replay: np.ndarray  # r_pt of the run (pretraining points: 0, where no term reads it)
    names: list[str] = field(default_factory=list)

    def subset(self, idx) -> "Points":
        return Points(*(getattr(self, k)[idx] for k in ("loss", "s1", "s1cpt", "s2pt", "s2cpt", "replay")),
                      [self.names[i] for i in idx])

    @classmethod
    def concat(cls, parts: list["Points"]) -> "Points":
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("loss", "s1", "s1cpt", "s2pt", "s2cpt", "replay")),
                   sum((p.names for p in parts), []))


def cpt_points(tr: Transfer, lr: np.ndarray, replay: float, steps, loss, name: str) -> Points:
    s1cpt, s2cpt = cpt_areas(tr, lr)
    steps = np.asarray(steps, dtype=np.int64)
    n = len(steps)
    return Points(np.asarray(loss, dtype=np.float64), np.full(n, tr.s1), s1cpt[steps], np.full(n, tr.s2), s2cpt[steps],
                  np.full(n, float(replay)), [f"{name}@{s}" for s in steps])


def pretrain_points(lr: np.ndarray, steps, loss, name: str) -> Points:
    s1, s2, _ = pretrain_areas(lr)
    steps = np.asarray(steps, dtype=np.int64)
    z = np.zeros(len(steps))
    return Points(np.asarray(loss, dtype=np.float64), s1[steps], z, s2[steps], z, z, [f"{name}@{s}" for s in steps])


# --- the law ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Form:
    """What a fit of one domain holds fixed: the role picks g1, g2; `replay` False sets g1 = g2 = 1;
    `fixed` maps parameter names to the values they keep."""
    role: str  # "old" or "new"
    replay: bool
    fixed: tuple = ()  # ((name, value), ...)

    @property
    def free(self) -> list[int]:
        held = dict(self.fixed)
        return [i for i, n in enumerate(NAMES) if n not in held]


def _natural(th: torch.Tensor) -> list[torch.Tensor]:
    """Fit space [S, 11] -> the parameters as [S, 1] columns (A, E, S1pt from their logs)."""
    return [th[:, i:i + 1].exp() if n in LOG_SPACE else th[:, i:i + 1] for i, n in enumerate(NAMES)]


def _terms(th: torch.Tensor, pts: dict, form: Form) -> tuple:
    """The law's pieces [S, M]: base power term S1^-alpha, annealing weight g1 and shift term
    (1 - (1 + E S1cpt)^-beta) g2, from fit-space parameters."""
    L0, A, alpha, C1, C2, B, E, beta, a1, a2, S1pt = _natural(th)
    power = (pts["s1"] + pts["s1cpt"] + S1pt) ** -alpha
    shift = 1 - (1 + E * pts["s1cpt"]) ** -beta
    r_cpt = 1 - pts["replay"]
    if not form.replay:
        g1, g2 = torch.ones_like(power), torch.ones_like(power)
    elif form.role == "old":
        g1, g2 = torch.exp(a1 * pts["replay"]), 1 - torch.exp(-a2 * r_cpt)
    else:
        g1, g2 = torch.exp(a1 * r_cpt), torch.exp(a2 * r_cpt) - 1
    return power, g1, shift * g2


def law(th: torch.Tensor, pts: dict, form: Form) -> torch.Tensor:
    """Predicted loss [S, M] for fit-space parameters th [S, 11]."""
    L0, A, _, C1, C2, B, *_ = _natural(th)
    power, g1, shift = _terms(th, pts, form)
    return L0 + A * power - C1 * pts["s2pt"] - C2 * pts["s2cpt"] * g1 + B * shift


def _tensors(p: Points) -> dict:
    return {k: torch.as_tensor(getattr(p, k), dtype=torch.float64) for k in ("s1", "s1cpt", "s2pt", "s2cpt", "replay")}


def _fit_value(name: str, value: float) -> float:
    if name not in LOG_SPACE:
        return value
    return math.log(value) if value > 0 else -math.inf  # S1pt = 0: a known pretraining's area is in the data


def to_fit_space(params: dict) -> np.ndarray:
    return np.array([_fit_value(n, params.get(n, 0.0)) for n in NAMES])


def from_fit_space(th: np.ndarray) -> dict:
    return {n: float(math.exp(v) if n in LOG_SPACE else v) for n, v in zip(NAMES, th)}


def predict(params: dict, form: Form, pts: Points) -> np.ndarray:
    th = torch.as_tensor(to_fit_space(params))[None]
    with torch.no_grad():
        return law(th, _tensors(pts), form)[0].numpy()


# --- fitting ----------------------------------------------------------------------------------------
def _squash(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Unconstrained values -> fit-space values inside BOUNDS (a scaled sigmoid), for the batched
    L-BFGS stages, which take no bounds: outside them the law has other optima (beta < 0, a2 < 0)."""
    out = x.clone()
    for j, i in enumerate(idx):
        if NAMES[i] in BOUNDS:
            lo, hi = BOUNDS[NAMES[i]]
            out[:, j] = lo + (torch.nn.functional.softplus(x[:, j]) if math.isinf(hi) else (hi - lo) * torch.sigmoid(x[:, j]))
    return out


def _unsquash(v: np.ndarray, idx: list[int]) -> np.ndarray:
    out = np.array(v, dtype=np.float64)
    for j, i in enumerate(idx):
        if NAMES[i] in BOUNDS:
            lo, hi = BOUNDS[NAMES[i]]
            if math.isinf(hi):
                out[:, j] = np.log(np.expm1(np.clip(out[:, j] - lo, 1e-12, 700)))
            else:
                u = np.clip((out[:, j] - lo) / (hi - lo), 1e-9, 1 - 1e-9)
                out[:, j] = np.log(u / (1 - u))
    return out


def _objective(x: torch.Tensor, base: torch.Tensor, free: list[int], pts: dict, log_loss: torch.Tensor,
               form: Form, squashed: bool = False) -> torch.Tensor:
    th = base.expand(len(x), -1).clone()
    th[:, free] = _squash(x, free) if squashed else x
    return huber(log_loss - law(th, pts, form).log()).sum(-1)


def _grid(p: Points, form: Form) -> np.ndarray:
    """Starts over the nonlinear parameters (fit space; linear ones 0 here, filled by least squares).
    E and S1pt are scaled by the largest CPT area seen."""
    span = max(float(p.s1cpt.max()), 1e-12)
    held = dict(form.fixed)
    axes = {"alpha": [0.05, 0.2, 0.4, 0.7], "E": [math.log(k / span) for k in (1, 10, 100, 1e3, 1e4)],
            "beta": [0.1, 0.3, 0.6, 1.0], "a1": [0.0, 1.0, 3.0], "a2": [0.3, 1.0, 3.0],
            "S1pt": [math.log(k * span) for k in (0.3, 1, 3, 10, 30)]}
    names = [n for n in axes if n not in held]
    rows = []
    for combo in itertools.product(*(axes[n] for n in names)):
        th = np.array([_fit_value(n, held[n]) if n in held else 0.0 for n in NAMES])
        th[[NAMES.index(n) for n in names]] = combo
        rows.append(th)
    return np.array(rows)


def _linear(th: torch.Tensor, pts: dict, loss: torch.Tensor, form: Form) -> tuple:
    """The free linear parameters by least squares on the loss at each row of th [S, 11] (normal
    equations: differentiable in the nonlinear ones): (prediction [S, M], coefficients [S, K], names)."""
    power, g1, shift = _terms(th, pts, form)
    cols = {"L0": torch.ones_like(power), "A": power, "C1": -pts["s2pt"].expand_as(power),
            "C2": -pts["s2cpt"] * g1, "B": shift}
    held = dict(form.fixed)
    names = [n for n in LINEAR if n not in held]
    fixed = sum(held[n] * cols[n] for n in LINEAR if n in held and held[n]) if any(held.get(n) for n in LINEAR) else 0.0
    X = torch.stack([cols[n] for n in names], -1)  # [S, M, K]
    gram = X.transpose(1, 2) @ X
    ridge = 1e-12 * gram.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] * torch.eye(len(names), dtype=X.dtype)
    coef = torch.linalg.solve(gram + ridge, X.transpose(1, 2) @ (loss - fixed)[None, :, None])[..., 0]
    # the signs the fit keeps (A > 0, C >= 0), applied here too so that the starts satisfy them
    floor = torch.tensor([1e-6 if n == "A" else 0.0 if n in BOUNDS else -math.inf for n in names], dtype=coef.dtype)
    coef = torch.maximum(coef, floor)
    return (X @ coef[..., None])[..., 0] + fixed, coef, names


def _projected(x: torch.Tensor, base: torch.Tensor, idx: list[int], pts: dict, loss: torch.Tensor, form: Form):
    """The objective over the free nonlinear parameters x [S, F], the linear ones solved at each
    (variable projection: a few well-scaled parameters where the full problem has long valleys)."""
    th = base.expand(len(x), -1).clone()
    th[:, idx] = _squash(x, idx)
    return huber(loss.log() - _linear(th, pts, loss, form)[0].log()).sum(-1)


def _with_linear(th: np.ndarray, pts: dict, loss: torch.Tensor, form: Form) -> np.ndarray:
    """Rows th [S, 11] with their least-squares linear parameters filled in (fit space)."""
    with torch.no_grad():
        _, coef, names = _linear(torch.as_tensor(th), pts, loss, form)
    out = th.copy()
    for k, n in enumerate(names):
        v = coef[:, k].numpy()
        out[:, NAMES.index(n)] = np.log(np.maximum(v, 1e-6)) if n in LOG_SPACE else v
    return out


@dataclass
class DomainFit:
    form: Form
    theta: np.ndarray  # fit space, all 11
    objective: float
    n_points: int

    @property
    def params(self) -> dict:
        return from_fit_space(self.theta)


def _bounds(free: list[int]) -> list[tuple]:
    return [BOUNDS.get(NAMES[i], (-math.inf, math.inf)) for i in free]


def fit_domain(p: Points, form: Form, starts=None, screen: int = STARTS) -> DomainFit:
    """Minimize the summed Huber(log) objective: from the best `screen` grid points, L-BFGS over the
    nonlinear parameters with the linear ones projected out, then over every parameter from each end
    point (or from `starts`, fit-space rows), and L-BFGS-B within the paper's signs from the best."""
    free = form.free
    if len(p.loss) <= len(free):
        raise UserError(f"--law cpt: {len(p.loss)} evaluations of a {form.role} domain for {len(free)} free "
                        f"parameters; evaluate more often (eval.interval_tokens) or add runs")
    pts, loss = _tensors(p), torch.as_tensor(p.loss)
    grid = _grid(p, form)
    base = torch.as_tensor(grid[:1])
    if starts is None:
        nonlinear = [i for i in free if NAMES[i] not in LINEAR]
        proj = functools.partial(_projected, base=base, idx=nonlinear, pts=pts, loss=loss, form=form)
        u = _unsquash(grid[:, nonlinear], nonlinear)
        with torch.no_grad():
            f = torch.nan_to_num(proj(torch.as_tensor(u)), nan=math.inf).numpy()
        x, f = batched_lbfgs(proj, u[np.argsort(f, kind="stable")[:screen]], iters=200)
        if not np.isfinite(f).any():
            raise UserError(f"--law cpt: no start gives a finite objective on the {form.role} domain; check that the "
                            f"runs log their LR ('lr') and validation losses")
        ends = np.repeat(grid[:1], len(x), 0)
        ends[:, nonlinear] = _squash(torch.as_tensor(x), nonlinear).numpy()
        starts = _with_linear(ends[np.isfinite(f)], pts, loss, form)[:, free]
    fn = functools.partial(_objective, base=base, free=free, pts=pts, log_loss=loss.log(), form=form)
    squashed = functools.partial(fn, squashed=True)
    x, f = batched_lbfgs(squashed, _unsquash(np.atleast_2d(starts), free), iters=200)
    best = _squash(torch.as_tensor(x[np.argmin(f)][None]), free)[0].numpy()
    x, obj = polish(fn, best, bounds=_bounds(free))
    theta = grid[0].copy()
    theta[free] = x
    return DomainFit(form, theta, obj, len(p.loss))


def bootstrap(p: Points, fit: DomainFit, k: int, seed: int) -> np.ndarray:
    """K refits on resampled points (with replacement), each from the full-data optimum: thetas [K, 11]."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        idx = rng.integers(0, len(p.loss), len(p.loss))
        out.append(fit_domain(p.subset(idx), fit.form, starts=fit.theta[fit.form.free][None]).theta)
    return np.array(out)
