"""Loss-curve laws under learning-rate schedules: loss as a function of the whole LR history.

Conventions (those of the Multi-Power Law code, Luo et al. 2025): `lr[s]` is the LR of step s for
s = 0..T, `S[t] = lr[0] + ... + lr[t]` (so S1(t) + S_W of the paper, the warmup area included), and
the drop at step k >= 1 is `lr[k-1] - lr[k]` (negative during warmup, as in their code).

- Tissue et al. 2024:  L(t) = L0 + A S[t]^-alpha - C S2(t),  S2(t) = sum_{i<=t} m_i,
  m_i = lam m_{i-1} + (lr[i-1] - lr[i]), lam = 0.999 (their decay factor).
- Multi-Power Law (Luo et al. 2025, eq. 7): L(t) = L0 + A S[t]^-alpha - LD(t),
  LD(t) = B sum_{k=1..t} (lr[k-1] - lr[k]) G(lr[k]^-gamma (S[t] - S[k-1])),  G(x) = 1 - (C x + 1)^-beta.
Both are fitted like Chinchilla: Huber (delta 1e-3) on log L - log pred, summed over every logged
point of every training curve.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.signal import lfilter

from ....errors import UserError
from .laws import batched_lbfgs, huber, polish

TISSUE_DECAY = 0.999  # Tissue et al. 2024, the momentum factor lambda of S2
MPL_NAMES = ("L0", "A", "alpha", "B", "C", "beta", "gamma")
TISSUE_NAMES = ("L0", "A", "alpha", "C")
CURVE_LAWS = ("multipower", "tissue")
MIN_CURVE_POINTS = {"multipower": 10, "tissue": 6}


@dataclass
class Curve:
    """One run's schedule and logged losses. `lr` has one entry per step 0..T; `steps`/`loss` are
    the logged points (steps <= T); `row_steps` are the steps of the input rows (for predictions)."""
    name: str
    lr: np.ndarray
    steps: np.ndarray
    loss: np.ndarray
    row_steps: np.ndarray

    @property
    def area(self) -> np.ndarray:
        return np.cumsum(self.lr)


def _drops(c: Curve):
    """(k, lr[k-1] - lr[k]) for the steps k >= 1 where the LR changes."""
    gap = np.zeros_like(c.lr)
    gap[1:] = c.lr[:-1] - c.lr[1:]
    k = np.nonzero(gap)[0]
    return k, gap[k]


def mpl_loss_drop(c: Curve, steps, B, C, beta, gamma, chunk_elems: int = 4_000_000) -> np.ndarray:
    """LD(t) at the given steps, exactly (every drop of every step), in chunks of rows."""
    S = c.area
    k, gap = _drops(c)
    lr_k = np.maximum(c.lr[k], 1e-30) ** -gamma
    steps = np.asarray(steps, dtype=np.int64)
    out = np.zeros(len(steps))
    rows = max(1, chunk_elems // max(1, len(k)))
    for i in range(0, len(steps), rows):
        t = steps[i:i + rows]
        area = S[t][:, None] - S[k - 1][None, :]                  # [rows, K] = S_k(t)
        g = 1 - (C * lr_k[None, :] * np.maximum(area, 0) + 1) ** -beta
        out[i:i + rows] = B * np.where(k[None, :] <= t[:, None], gap[None, :] * g, 0).sum(-1)
    return out


def tissue_s2(c: Curve, decay: float = TISSUE_DECAY) -> np.ndarray:
    """S2 at every step: the momentum-smoothed sum of LR drops (Tissue et al. 2024, eq. 5)."""
    gap = np.zeros_like(c.lr)
    gap[1:] = c.lr[:-1] - c.lr[1:]
    return np.cumsum(lfilter([1.0], [1.0, -decay], gap))


def predict_curve(law: str, params: dict, c: Curve, steps=None) -> np.ndarray:
    """Predicted loss at `steps` (default: every input row) of curve c."""
    steps = c.row_steps if steps is None else np.asarray(steps, dtype=np.int64)
    area = c.area[steps]
    with np.errstate(divide="ignore"):  # no LR summed yet (step 0 of a warmup): no prediction
        base = np.where(area > 0, params["L0"] + params["A"] * area ** -params["alpha"], np.nan)
    if law == "tissue":
        return base - params["C"] * tissue_s2(c)[steps]
    return base - mpl_loss_drop(c, steps, params["B"], params["C"], params["beta"], params["gamma"])


def curve_metrics(pred: np.ndarray, loss: np.ndarray) -> dict:
    """The Multi-Power Law paper's metrics: R^2, MAE, RMSE, PredE (mean relative), WorstE (max relative)."""
    err = pred - loss
    return {"r2": float(1 - np.sum(err ** 2) / np.sum((loss - loss.mean()) ** 2)),
            "mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2))),
            "pred_e": float(np.mean(np.abs(err) / loss)), "worst_e": float(np.max(np.abs(err) / loss))}


# --- fitting ------------------------------------------------------------------------------------
@dataclass
class _Blocks:
    """Drops merged into short blocks (for the fit only): each block's gap sum sits at its
    gap-weighted mean area and LR, and counts for a logged step t once t >= its last step."""
    area_t: torch.Tensor   # [n_t, 1] S[t] at the logged steps
    area_k: torch.Tensor   # [1, n_b] S[k-1]
    lr_k: torch.Tensor     # [1, n_b]
    gap: torch.Tensor      # [n_t, n_b] gap sums, zero where the block ends after t


def _blocks(c: Curve, max_len: int = 128, max_frac: float = 5e-3) -> _Blocks:
    """A block ends after max_len steps, at a sign change, or once its |gap sum| would exceed
    max_frac * max(lr): sharp drops stay one step per block, so the merge error stays below ~1e-4."""
    S, (k, gap) = c.area, _drops(c)
    cap = max_frac * c.lr.max()
    groups, cur = [], [0]
    for i in range(1, len(k)):
        s = gap[cur].sum()
        if (k[i] - k[cur[0]] >= max_len or np.sign(gap[i]) != np.sign(gap[cur[0]])
                or abs(s + gap[i]) > cap):
            groups.append(cur)
            cur = []
        cur.append(i)
    groups = [g for g in groups + [cur] if g and len(k)]
    w = [np.abs(gap[g]) for g in groups]
    area_k = np.array([np.average(S[k[g] - 1], weights=wi) for g, wi in zip(groups, w)])
    lr_k = np.array([np.average(c.lr[k[g]], weights=wi) for g, wi in zip(groups, w)])
    last = np.array([k[g[-1]] for g in groups], dtype=np.int64)
    gsum = np.array([gap[g].sum() for g in groups])
    mask = last[None, :] <= c.steps[:, None]
    return _Blocks(_t64(S[c.steps])[:, None], _t64(area_k)[None], _t64(lr_k)[None],
                   _t64(np.where(mask, gsum[None], 0.0)))


def _t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def _mpl_batched(theta: torch.Tensor, curves, blocks) -> torch.Tensor:
    """Summed Huber objective for theta [S, 7] = (L0, log A, alpha, log B, log C, beta, gamma)."""
    L0, lA, alpha, lB, lC, beta, gamma = (theta[:, i, None, None] for i in range(7))
    total = 0.0
    for c, b in zip(curves, blocks):
        x = lC.exp() * b.lr_k ** -gamma * (b.area_t - b.area_k).clamp_min(0)
        ld = lB.exp()[..., 0] * (b.gap * (1 - (x + 1) ** -beta)).sum(-1)             # [S, n_t]
        pred = L0[..., 0] + lA.exp()[..., 0] * b.area_t[:, 0] ** -alpha[..., 0] - ld
        total = total + huber(torch.as_tensor(np.log(c.loss)) - pred.log()).sum(-1)
    return total


def _tissue_batched(theta, curves, s2s):
    L0, lA, alpha, C = (theta[:, i, None] for i in range(4))
    total = 0.0
    for c, s2 in zip(curves, s2s):
        area = torch.as_tensor(c.area[c.steps])
        pred = L0 + lA.exp() * area ** -alpha - C * torch.as_tensor(s2[c.steps])
        total = total + huber(torch.as_tensor(np.log(c.loss)) - pred.log()).sum(-1)
    return total


def _starts(law: str, min_loss: float) -> np.ndarray:
    """A small grid around the values the Multi-Power Law paper reports for 25M-400M models."""
    L0 = [min_loss - 0.05, min_loss - 0.2, min_loss - 0.5]
    A, alpha = [math.log(0.3), math.log(1.0)], [0.3, 0.6]
    if law == "tissue":
        return np.array([(a, b, c, d) for a in L0 for b in A for c in alpha for d in (30.0, 300.0)])
    return np.array([(a, b, c, math.log(B), math.log(C), 0.5, 0.5) for a in L0 for b in A for c in alpha
                     for B in (100.0, 500.0) for C in (0.5, 2.0)])


@dataclass
class CurveFit:
    law: str
    params: dict
    objective: float
    n_points: int


def fit_curves(law: str, curves: list[Curve], starts: int = 4, iters: int = 30, polish_top: int = 1) -> CurveFit:
    """Screen a small grid of starts, run batched L-BFGS from the best `starts`, then scipy
    L-BFGS-B from the best `polish_top` end points."""
    n = sum(len(c.steps) for c in curves)
    if n < MIN_CURVE_POINTS[law]:
        raise UserError(f"--law {law}: {n} logged losses in {', '.join(c.name for c in curves)}; "
                        f"the law needs at least {MIN_CURVE_POINTS[law]}: log the loss more often")
    if law == "tissue":
        aux = [tissue_s2(c) for c in curves]
        fn = functools.partial(_tissue_batched, curves=curves, s2s=aux)
    else:
        aux = [_blocks(c) for c in curves]
        fn = functools.partial(_mpl_batched, curves=curves, blocks=aux)
    grid = _starts(law, min(c.loss.min() for c in curves))
    with torch.no_grad():
        screen = torch.nan_to_num(fn(torch.as_tensor(grid)), nan=math.inf).numpy()
    x, f = batched_lbfgs(fn, grid[np.argsort(screen)[:starts]], iters=iters)
    order = [i for i in np.argsort(f) if np.isfinite(f[i])][:polish_top]
    if not order:
        raise UserError(f"--law {law}: no start gives a finite objective on {curves[0].name}: "
                        f"check that the lr column holds learning rates and loss holds losses")
    theta, obj = min((polish(fn, x[i]) for i in order), key=lambda r: r[1])
    names = TISSUE_NAMES if law == "tissue" else MPL_NAMES
    vals = [float(v) for v in theta]
    for i in ((1,) if law == "tissue" else (1, 3, 4)):  # stored in log space
        vals[i] = math.exp(vals[i])
    return CurveFit(law, dict(zip(names, vals)), obj, n)
