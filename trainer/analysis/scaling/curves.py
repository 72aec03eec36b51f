"""Loss-curve laws under learning-rate schedules: loss as a function of the whole LR history.

Conventions (those of the Multi-Power Law code, Luo et al. 2025): `lr[s]` is the LR of step s for
s = 0..T, `S[t] = lr[0] + ... + lr[t]` (so S1(t) + S_W of the paper, the warmup area included), and
the drop at step k >= 1 is `lr[k-1] - lr[k]` (negative during warmup, as in their code).

- Tissue et al. 2024:  L(t) = L0 + A S[t]^-alpha - C S2(t),  S2(t) = sum_{i<=t} m_i,
  m_i = lam m_{i-1} + (lr[i-1] - lr[i]), lam = 0.999 (their decay factor).
- Multi-Power Law (Luo et al. 2025, eq. 7): L(t) = L0 + A S[t]^-alpha - LD(t),
  LD(t) = B sum_{k=1..t} (lr[k-1] - lr[k]) G(lr[k]^-gamma (S[t] - S[k-1])),  G(x) = 1 - (C x + 1)^-beta.
  LD has a term per (step, drop) pair: 2.6e9 at every step of a 72,000-step cosine. `mpl_loss_drop`
  sums them pair by pair in blocks of steps, one block in memory at a time, or, where that is more
  work (predictions at every step), the pairs of the last NEAR_STEPS steps one by one and older
  drops through a sum of exponentials carried from chunk to chunk: memory and work linear in T,
  the pairwise sum to float64 rounding.

Both objectives are the papers': Huber (delta 1e-3) of log L - log pred, summed over every logged
point of every training curve. Tissue's law is minimized (L-BFGS from a grid: its optimum is
unique). The Multi-Power Law is fitted the way its authors' code does it (`fit_mpl`): an
early-stopped AdamW run, not a minimization. On their 25M curves the true minimum of the objective
(1.38e-4, vs 2.91e-4 where their run stops) predicts the held-out schedules worse (MAE 0.0046 vs
0.0038).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special
from scipy.signal import lfilter

from ....errors import UserError
from .laws import HUBER_DELTA, batched_lbfgs, huber, polish

TISSUE_DECAY = 0.999  # Tissue et al. 2024, the momentum factor lambda of S2
MPL_NAMES = ("L0", "A", "alpha", "B", "C", "beta", "gamma")
TISSUE_NAMES = ("L0", "A", "alpha", "C")
CURVE_LAWS = ("multipower", "tissue")
MIN_CURVE_POINTS = {"multipower": 10, "tissue": 6}
# The MPL fit of thu-yao-01-luo/MultiPowerLaw @ 8da9f190 (src/config.py, src/fitting.py): AdamW
# with torch's defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01) at these LRs, stopped after
# MPL_PATIENCE steps without a new minimum, after MPL_STEPS, or below MPL_GTOL gradient norm.
MPL_FAST, MPL_SLOW = (0, 1, 3, 4), (2, 5, 6)  # L0, A, B, C at LR 5e-2; alpha, beta, gamma at 5e-3
MPL_LRS = (5e-2, 5e-3)
MPL_STEPS, MPL_PATIENCE, MPL_GTOL = 200, 20, 1e-5
FIT_BLOCK_BYTES = 256 * 2**20  # the fit's drop blocks kept in memory between objective evaluations


@dataclass
class Curve:
    """One run's schedule and logged losses. `lr` has one entry per step 0..T; `steps`/`loss` are
    the logged points (steps <= T); `row_steps` are the steps of the input rows (for predictions)."""
    name: str
    lr: np.ndarray
    steps: np.ndarray
    loss: np.ndarray
    row_steps: np.ndarray

    # Computed once per curve (a schedule is not changed after it is read): every block of LD uses them.
    @functools.cached_property
    def area(self) -> np.ndarray:
        return np.cumsum(self.lr)

    @functools.cached_property
    def drops(self) -> tuple[np.ndarray, np.ndarray]:
        """(k, lr[k-1] - lr[k]) for the steps k >= 1 where the LR changes."""
        gap = np.zeros_like(self.lr)
        gap[1:] = self.lr[:-1] - self.lr[1:]
        k = np.nonzero(gap)[0]
        return k, gap[k]


def _t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def _drop_blocks(c: Curve, steps, rows: int = 16, dtype=torch.float64, since: int = 0):
    """LD's inputs at `steps`, `rows` steps at a time: area [r, K] = S[t] - S[k-1] and drop [r, K]
    over the drops `since` <= k <= the block's latest step (both 0 where k > t), log lr[k] [K], and
    the sum of the drops up to t [r] (float64). Blocks of nearby steps waste little on the k > t
    triangle; every drop is kept, so LD is exact. A generator: one block in memory at a time."""
    S, (k, gap) = c.area, c.drops
    lo = np.searchsorted(k, since)
    for i in range(0, len(steps), rows):
        t = steps[i:i + rows]
        hi = np.searchsorted(k, t.max(), side="right")
        kb, gb = k[lo:hi], gap[lo:hi]
        on = kb[None] <= t[:, None]
        drop = torch.as_tensor(np.where(on, gb[None], 0.0), dtype=dtype)
        yield (torch.as_tensor(np.where(on, S[t][:, None] - S[kb - 1][None], 0.0), dtype=dtype), drop,
               torch.as_tensor(np.log(np.maximum(c.lr[kb], 1e-30)), dtype=dtype), drop.sum(-1, dtype=torch.float64))


def _loss_drop(blocks, C: float, beta: float, gamma: float, grad: bool = False):
    """LD / B at the blocks' steps [n], and with `grad` its derivatives in (C, beta, gamma) [3, n].
    Elementwise in the blocks' dtype, summed in float64."""
    # Results are gathered as Python floats: a small tensor kept per block would sit on the C heap
    # between the blocks' large temporaries and keep their memory from being reused.
    f64, ld, d = torch.float64, [], [[], [], []]
    for area, drop, log_lr, drop_sum in blocks:
        x = area * (C * torch.exp(-gamma * log_lr))             # [r, K]: C lr_k^-gamma S_k(t)
        log1px = torch.log1p(x)
        dq = drop * torch.exp(log1px * -beta)                    # drop * (1 + x)^-beta
        ld += (drop_sum - dq.sum(-1, dtype=f64)).tolist()
        if grad:
            dqx = dq * (x / (1 + x))                             # d(drop * G) / d log x, over beta
            for out, v in zip(d, (dqx.sum(-1, dtype=f64) * (beta / C), (dq * log1px).sum(-1, dtype=f64),
                                  (dqx * log_lr).sum(-1, dtype=f64) * -beta)):
                out += v.tolist()
    ld = torch.tensor(ld, dtype=f64)
    return (ld, torch.tensor(d, dtype=f64)) if grad else ld


# (1 + x)^-beta of the drops older than NEAR_STEPS steps as a sum of exponentials: the trapezoidal
# rule in tau on y^-beta = Gamma(beta)^-1 int exp(beta tau - y e^tau) dtau (Beylkin and Monzon 2010),
# its nodes spaced for a relative error below SOE_EPS (the bound of Trefethen and Weideman 2014,
# Thm 5.1, on the strip |Im tau| < SOE_STRIP) and its tails cut below SOE_EPS of y^-beta.
SOE_EPS = 1e-16
SOE_STRIP = 1.2  # < pi/2, where the integrand stays analytic
NEAR_STEPS = 128  # per step, the chunk's pairs (NEAR_STEPS / 2) cost about what its 2 J exponentials do


def _exponentials(beta: float, log_y_lo: float, y_hi: float, most: int) -> tuple | None:
    """(s [J], log q [J]) with y^-beta = sum_j q_j exp(-s_j y) on [y_lo, y_hi], or None if that takes
    more than `most` terms."""
    h = 2 * math.pi * SOE_STRIP / (math.log(2 / SOE_EPS) - beta * math.log(math.cos(SOE_STRIP)))
    # the tails: P(beta, v) <= v^beta / Gamma(beta + 1) below, Q(beta, v) = SOE_EPS above
    lo = (math.log(SOE_EPS) + special.gammaln(beta + 1)) / beta - math.log(y_hi)
    hi = math.log(special.gammainccinv(beta, SOE_EPS)) - log_y_lo
    n = (hi - lo) / h + 1
    if not n < most:
        return None
    tau = lo + h * np.arange(math.ceil(n))
    return np.exp(tau), beta * tau + math.log(h) - special.gammaln(beta)


def _loss_drop_by_exponentials(c: Curve, steps, C: float, beta: float, gamma: float, exps, log_a) -> np.ndarray:
    """LD / B at sorted `steps`, chunk by chunk of NEAR_STEPS steps: the chunk's own drops pair by pair
    (`_drop_blocks`), older ones from a state g [J]. With a_k = C lr_k^-gamma, y = 1/a_k + S[t] - S[k-1]:
    (1 + a_k (S[t] - S[k-1]))^-beta = a_k^-beta y^-beta = sum_j q_j a_k^-beta exp(-s_j y), and from one
    chunk to the next every term of g decays by exp(-s_j (S[t1] - S[t0])). Memory O(J NEAR_STEPS)."""
    S, (k, gap) = c.area, c.drops
    before = np.concatenate([[0.0], S])                          # before[t] = S[t-1], the LR summed before t
    s, log_q = exps
    g, older, out = np.zeros(len(s)), 0.0, np.empty(len(steps))  # g_j at step t0 - 1; older: drops k < t0
    for t0 in range(0, int(steps[-1]) + 1, NEAR_STEPS):
        (i0, i1), (j0, j1) = (np.searchsorted(a, [t0, t0 + NEAR_STEPS]) for a in (steps, k))
        t = steps[i0:i1]
        if len(t):
            near = _loss_drop(_drop_blocks(c, t, rows=len(t), since=t0), C, beta, gamma).numpy()
            out[i0:i1] = near + older - np.exp(-np.outer(S[t] - before[t0], s)) @ g
        end = min(t0 + NEAR_STEPS, len(S)) - 1                  # fold the chunk's drops into g at its end
        y = np.exp(-log_a[j0:j1]) + (S[end] - before[k[j0:j1]])
        g = g * np.exp(-s * (S[end] - before[t0])) + gap[j0:j1] @ np.exp(
            log_q - beta * log_a[j0:j1, None] - np.outer(y, s))
        older += gap[j0:j1].sum()
    return out


def mpl_loss_drop(c: Curve, steps, B, C, beta, gamma) -> np.ndarray:
    """LD(t) at the given steps, with every drop of every step: pair by pair, or through exponentials
    (to float64 rounding) where that needs fewer kernel evaluations, as on schedules given per step."""
    steps = np.asarray(steps, dtype=np.int64)
    k, _ = c.drops
    pairs = np.searchsorted(k, steps, side="right").sum()
    if C > 0 and beta > 0 and pairs > 0:  # else the kernel is no sum of decaying exponentials
        log_a = math.log(C) - gamma * np.log(np.maximum(c.lr[k], 1e-30))
        # J exponentials per step and per drop replace the pairs if J is below this
        most = pairs // (len(steps) + np.searchsorted(k, steps.max(), side="right"))
        exps = _exponentials(beta, -log_a.max(), c.area[-1] + np.exp(-log_a).max(), most)
        if exps is not None:
            order = np.argsort(steps, kind="stable")
            out = np.empty(len(steps))
            out[order] = _loss_drop_by_exponentials(c, steps[order], C, beta, gamma, exps, log_a)
            return B * out
    return B * _loss_drop(_drop_blocks(c, steps), C, beta, gamma).numpy()


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


# --- Multi-Power Law fit: Luo et al.'s procedure ----------------------------------------------------
@dataclass
class _Rebuilt:
    """Drop blocks built anew on every pass over them: memory one block, time one rebuild per pass."""
    c: Curve
    dtype: torch.dtype

    def __iter__(self):
        return _drop_blocks(self.c, self.c.steps, dtype=self.dtype)


def _mpl_data(curves, dtype=torch.float32) -> list:
    """(S[t], log loss, drop blocks) of each curve at its logged steps. The fit's blocks are float32:
    it runs 2.4x faster and the AdamW path moves by ~1e-8 relative in the parameters (1e-6 in the
    objective), far less than the 3e-4 by which the lowest iterate beats the next on the 25M curves.
    Every objective evaluation passes over the same blocks: they are built once while all the curves'
    blocks fit in FIT_BLOCK_BYTES, else rebuilt on each pass."""
    data, room = [], FIT_BLOCK_BYTES
    for c in curves:
        size = 2 * dtype.itemsize * int(np.searchsorted(c.drops[0], c.steps, side="right").sum())  # area, drop
        if size <= room:
            blocks, room = list(_drop_blocks(c, c.steps, dtype=dtype)), room - size
        else:
            blocks = _Rebuilt(c, dtype)
        data.append((_t64(c.area[c.steps]), _t64(np.log(c.loss)), blocks))
    return data


def mpl_value_grad(theta, data) -> tuple[float, np.ndarray]:
    """The summed Huber objective at theta = (L0, A, alpha, B, C, beta, gamma) and its gradient."""
    L0, A, alpha, B, C, beta, gamma = (float(v) for v in theta)
    f, g = 0.0, np.zeros(7)
    for area, log_loss, blocks in data:
        ld, (d_C, d_beta, d_gamma) = _loss_drop(blocks, C, beta, gamma, grad=True)
        power = area ** -alpha
        pred = L0 + A * power - B * ld
        r = log_loss - pred.clamp_min(1e-10).log()               # their clamp: a finite objective
        f += float(huber(r).sum())
        w = torch.where(pred > 1e-10, -r.clamp(-HUBER_DELTA, HUBER_DELTA) / pred, 0.0)  # d obj / d pred
        jac = torch.stack([torch.ones_like(pred), power, -A * power * area.log(), -ld, -B * d_C, -B * d_beta,
                           -B * d_gamma])
        g += (jac @ w).numpy()
    return f, g


def _mpl_start(curves) -> np.ndarray:
    """Their `initialize_params`: L0, A, alpha, B of the law with LD(t) replaced by
    B (peak LR - lr[t]), by L-BFGS-B (all >= 0) from their 135-point grid around a log-log line fit,
    then C = 1, beta = gamma = 0.5. (Their code has peak LR 3e-4 written in; we use each curve's.)"""
    area = np.concatenate([c.area[c.steps] for c in curves])
    loss = np.concatenate([c.loss for c in curves])
    drop = _t64(np.concatenate([c.lr.max() - c.lr[c.steps] for c in curves]))
    lo = loss.min()
    slope, icept = np.polyfit(np.log(area), np.log(loss - lo + 0.01), 1)
    grid = np.array(list(itertools.product(
        np.linspace(lo - 0.2, lo + 0.2, 5), np.linspace(math.exp(icept) - 0.1, math.exp(icept) + 0.1, 3),
        np.linspace(-slope - 0.1, -slope + 0.1, 3), np.linspace(100, 1000, 3))))
    area_t, log_loss = _t64(area), _t64(np.log(loss))

    def fn(th):  # [S, 4] -> [S]
        L0, A, alpha, B = (th[:, i, None] for i in range(4))
        return huber(log_loss - (L0 + A * area_t ** -alpha - B * drop).log()).sum(-1)
    # Every start of the grid ends at the same optimum on their curves: the batched run only
    # replaces their 135 scipy runs, the bounded polish makes it theirs to ~1e-9.
    x, f = batched_lbfgs(fn, grid, iters=50)
    theta, _ = polish(fn, x[np.argmin(f)], bounds=[(0, np.inf)] * 4)
    return np.concatenate([theta, [1.0, 0.5, 0.5]])


def mpl_adamw_path(curves) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """Their `mpl_adam_fit` from `_mpl_start`: (theta, objective at theta, theta after the AdamW
    step) for every step their code may keep, i.e. up to the stopping rule, which it checks after
    the step and before keeping a best."""
    fg = functools.partial(mpl_value_grad, data=_mpl_data(curves))
    groups = [torch.tensor(_mpl_start(curves)[list(idx)]) for idx in (MPL_FAST, MPL_SLOW)]
    opt = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(groups, MPL_LRS)])

    def current():
        theta = np.empty(7)
        for p, idx in zip(groups, (MPL_FAST, MPL_SLOW)):
            theta[list(idx)] = p.detach().numpy()
        return theta
    path, lowest, stale = [], math.inf, 0
    for step in range(MPL_STEPS):
        theta = current()
        f, g = fg(theta)
        if not math.isfinite(f):
            break
        for p, idx in zip(groups, (MPL_FAST, MPL_SLOW)):
            p.grad = torch.as_tensor(g[list(idx)])
        opt.step()
        stale = 0 if f < lowest else stale + 1
        lowest = min(lowest, f)
        if (step > MPL_PATIENCE and stale >= MPL_PATIENCE) or np.linalg.norm(g) < MPL_GTOL:
            break
        path.append((theta, f, current()))
    return path


def fit_mpl(curves) -> tuple[np.ndarray, float]:
    """The parameters their code returns: read after the AdamW step taken from the lowest
    objective, one step past it (the published 25M/100M/400M parameters are those)."""
    path = mpl_adamw_path(curves)
    if not path:
        raise UserError(f"--law multipower: the objective is not finite at the start on {curves[0].name}: "
                        f"check that the lr column holds learning rates and loss holds losses")
    theta = min(path, key=lambda p: p[1])[2]
    return theta, mpl_value_grad(theta, _mpl_data(curves, torch.float64))[0]


# --- Tissue et al. fit ------------------------------------------------------------------------------
def _tissue_batched(theta, curves, s2s):
    """Summed Huber objective for theta [S, 4] = (L0, log A, alpha, C)."""
    L0, lA, alpha, C = (theta[:, i, None] for i in range(4))
    total = 0.0
    for c, s2 in zip(curves, s2s):
        area = torch.as_tensor(c.area[c.steps])
        pred = L0 + lA.exp() * area ** -alpha - C * torch.as_tensor(s2[c.steps])
        total = total + huber(torch.as_tensor(np.log(c.loss)) - pred.log()).sum(-1)
    return total


def fit_tissue(curves, starts: int = 4, iters: int = 30) -> tuple[np.ndarray, float]:
    """Screen a small grid of starts (L0 below the lowest loss), batched L-BFGS from the best
    `starts`, scipy L-BFGS-B from the best end point."""
    fn = functools.partial(_tissue_batched, curves=curves, s2s=[tissue_s2(c) for c in curves])
    lo = min(c.loss.min() for c in curves)
    grid = np.array(list(itertools.product([lo - 0.05, lo - 0.2, lo - 0.5], [math.log(0.3), 0.0], [0.3, 0.6],
                                           [0.1, 1.0])))
    with torch.no_grad():
        screen = torch.nan_to_num(fn(torch.as_tensor(grid)), nan=math.inf).numpy()
    x, f = batched_lbfgs(fn, grid[np.argsort(screen)[:starts]], iters=iters)
    if not np.isfinite(f).any():
        raise UserError(f"--law tissue: no start gives a finite objective on {curves[0].name}: "
                        f"check that the lr column holds learning rates and loss holds losses")
    theta, obj = polish(fn, x[np.argmin(f)])
    return np.concatenate([theta[:1], [math.exp(theta[1])], theta[2:]]), obj


@dataclass
class CurveFit:
    law: str
    params: dict
    objective: float
    n_points: int


def fit_curves(law: str, curves: list[Curve]) -> CurveFit:
    n = sum(len(c.steps) for c in curves)
    if n < MIN_CURVE_POINTS[law]:
        raise UserError(f"--law {law}: {n} logged losses in {', '.join(c.name for c in curves)}; "
                        f"the law needs at least {MIN_CURVE_POINTS[law]}: log the loss more often")
    theta, obj = fit_tissue(curves) if law == "tissue" else fit_mpl(curves)
    names = TISSUE_NAMES if law == "tissue" else MPL_NAMES
    return CurveFit(law, dict(zip(names, map(float, theta))), obj, n)
