"""Scaling laws over model size N and training tokens D, and their robust fitting.

Every law is a log-loss predictor `log_pred(theta [S, P], logN [M], logD [M]) -> [S, M]` over a
batch of S parameter vectors, so the whole grid of starts is screened in one tensor op. Fitting
follows Hoffmann et al. 2022, Approach 3: the Huber loss (delta 1e-3) of log L - log_pred, *summed*
over points (Besiroglu et al. 2024 showed the published fit used a mean and stopped early), minimized
by L-BFGS from a grid of starts.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.optimize import minimize

from ....errors import UserError

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, Sec. D.2


@dataclass(frozen=True)
class Law:
    name: str
    theta_names: tuple[str, ...]          # the fitted vector (log-space amplitudes)
    log_pred: Callable                    # (theta [S,P], logN [M], logD [M]) -> log L [S,M]
    grid: Callable[[], np.ndarray]        # starts [S, P]
    to_params: Callable[[np.ndarray], dict]
    from_params: Callable[[dict], np.ndarray]
    chinchilla_form: bool                 # E + A/N^alpha + B/D^beta (closed-form allocation)
    doc: str
    objective: str = "huber_log"          # "huber_log" (Chinchilla) or "lsq" (Gadre et al.)


def _lse(*terms: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(torch.stack(torch.broadcast_tensors(*terms)), dim=0)


# --- Chinchilla (Hoffmann et al. 2022, eq. 2 and Approach 3) ---------------------------------
def _chin_log_pred(th, lN, lD):
    a, b, e, alpha, beta = (th[:, i:i + 1] for i in range(5))
    return _lse(a - alpha * lN, b - beta * lD, e)


def _chin_grid():
    # Approach 3 starts: alpha, beta in 0..2 step .5; e in -1..1 step .5; a, b in 0..25 step 5.
    ab = np.arange(0, 2.01, 0.5)
    e = np.arange(-1, 1.01, 0.5)
    ab0 = np.arange(0, 25.1, 5)
    return np.array([(a, b, ee, al, be) for a, b, ee, al, be in itertools.product(ab0, ab0, e, ab, ab)])


def _chin_to(th):
    a, b, e, alpha, beta = th
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def _chin_from(p):
    return np.array([math.log(p["A"]), math.log(p["B"]), math.log(p["E"]), p["alpha"], p["beta"]])


# --- Kaplan et al. 2020, eq. 1.5: L = [(Nc/N)^(aN/aD) + Dc/D]^aD ------------------------------
def _kap_log_pred(th, lN, lD):
    lNc, lDc, aN, aD = (th[:, i:i + 1] for i in range(4))
    return aD * _lse(aN / aD * (lNc - lN), lDc - lD)


def _kap_grid():
    # Kaplan's fit (Nc 6.4e13, Dc 1.8e13, aN .076, aD .103) lies inside this grid.
    logs = [math.log(10.0) * k for k in (9, 11, 13, 15)]
    exps = [0.03, 0.08, 0.2, 0.5]
    return np.array(list(itertools.product(logs, logs, exps, exps)))


def _kap_to(th):
    lNc, lDc, aN, aD = th
    return {"Nc": math.exp(lNc), "Dc": math.exp(lDc), "alpha_N": aN, "alpha_D": aD}


def _kap_from(p):
    return np.array([math.log(p["Nc"]), math.log(p["Dc"]), p["alpha_N"], p["alpha_D"]])


# --- Gadre et al. 2024, eq. 4 in N and M = D/N: L = E + a N^b + c 6^(b/2) (M N)^b -------------
# (the `alpha`, `beta` of the paper are the amplitudes a, c here; b < 0 is the shared exponent)
def _gad_log_pred(th, lN, lD):
    e, la, lc, b = (th[:, i:i + 1] for i in range(4))
    return _lse(e, la + b * lN, lc + 0.5 * b * math.log(6.0) + b * lD)


def _gad_grid():
    # Gadre et al.'s starts (alpha, beta in {1e2, 3e2, 1e3, 3e3}, b in {-.1, -.3}, E in {0, 1, 2,
    # 10}), in log space, with E = 0 moved to 0.1.
    amp = [math.log(v) for v in (1e2, 3e2, 1e3, 3e3)]
    e = [math.log(v) for v in (0.1, 1.0, 2.0, 10.0)]
    return np.array(list(itertools.product(e, amp, amp, (-0.1, -0.3))))


def _gad_to(th):
    e, la, lc, b = th
    return {"E": math.exp(e), "alpha": math.exp(la), "beta": math.exp(lc), "b": b}


def _gad_from(p):
    return np.array([math.log(p["E"]), math.log(p["alpha"]), math.log(p["beta"]), p["b"]])


_CHIN = dict(theta_names=("a", "b", "e", "alpha", "beta"), log_pred=_chin_log_pred, grid=_chin_grid,
             to_params=_chin_to, from_params=_chin_from, chinchilla_form=True)
LAWS = {
    "chinchilla": Law("chinchilla", **_CHIN, doc="Hoffmann et al. 2022: E + A/N^alpha + B/D^beta"),
    "chinchilla_sparse": Law(
        "chinchilla_sparse", **_CHIN,
        doc="Jin et al. 2025: Chinchilla with N = average non-zero parameter count over training"),
    "kaplan": Law("kaplan", ("lNc", "lDc", "alpha_N", "alpha_D"), _kap_log_pred, _kap_grid, _kap_to,
                  _kap_from, False, doc="Kaplan et al. 2020: [(Nc/N)^(aN/aD) + Dc/D]^aD"),
    # Gadre et al. fit by least squares on L itself (scipy curve_fit in mlfoundations/scaling).
    "gadre": Law("gadre", ("e", "la", "lc", "b"), _gad_log_pred, _gad_grid, _gad_to, _gad_from,
                 False, doc="Gadre et al. 2024: E + alpha N^b + beta 6^(b/2) (M N)^b, M = D/N",
                 objective="lsq"),
}
MIN_POINTS = {"chinchilla": 6, "chinchilla_sparse": 6, "kaplan": 5, "gadre": 5}


def get_law(name: str) -> Law:
    if name not in LAWS:
        raise UserError(f"--law {name}: unknown law; choose one of {', '.join(sorted(LAWS))}, "
                        f"multipower, tissue, cpt, dcpt")
    return LAWS[name]


def huber(r: torch.Tensor, delta: float = HUBER_DELTA) -> torch.Tensor:
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


@dataclass
class Data:
    """log N, log D, log L and L as float64 tensors [M]."""
    lN: torch.Tensor
    lD: torch.Tensor
    lL: torch.Tensor
    L: torch.Tensor

    @classmethod
    def of(cls, n, d, loss) -> "Data":
        t = [torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (n, d, loss)]
        return cls(t[0].log(), t[1].log(), t[2].log(), t[2])


def objective(law: Law, theta: torch.Tensor, data: Data) -> torch.Tensor:
    """The fit objective of each row of theta [S, P] -> [S], summed over points."""
    lp = law.log_pred(theta, data.lN, data.lD)
    if law.objective == "lsq":
        return ((data.L - lp.exp()) ** 2).sum(-1)
    return huber(data.lL - lp).sum(-1)


def value_grad(fn, x):
    """fn: theta [S, P] -> [S] (rows independent); returns f [S] (nan -> inf) and df/dtheta."""
    x = x.detach().requires_grad_(True)
    f = fn(x)
    g, = torch.autograd.grad(torch.nan_to_num(f, nan=0.0, posinf=0.0).sum(), x)
    return torch.nan_to_num(f.detach(), nan=math.inf), g


def _two_loop(g, hs, hy, rho):
    """L-BFGS direction -H g for every row; empty history slots have rho = 0 and do nothing."""
    q, al = g.clone(), []
    for i in reversed(range(hs.shape[1])):
        a = rho[:, i] * (hs[:, i] * q).sum(-1)
        q -= a[:, None] * hy[:, i]
        al.append(a)
    yy = (hy[:, -1] ** 2).sum(-1)
    gamma = torch.where(rho[:, -1] > 0, 1 / (rho[:, -1] * yy).clamp_min(1e-300),
                        1e-2 / g.norm(dim=-1).clamp_min(1e-300))
    d = gamma[:, None] * q
    for i, a in zip(range(hs.shape[1]), reversed(al)):
        d += (a - rho[:, i] * (hy[:, i] * d).sum(-1))[:, None] * hs[:, i]
    d = -d
    return torch.where(((g * d).sum(-1) < 0)[:, None], d, -g * gamma[:, None])


def _armijo(fn, x, f, g, d, halvings: int = 30):
    """Backtracking from t = 1; rows that never satisfy Armijo keep x (moved = False)."""
    gd = (g * d).sum(-1)
    t = torch.ones(len(x), dtype=x.dtype)
    xn, fn_, todo = x.clone(), f.clone(), torch.ones(len(x), dtype=torch.bool)
    for _ in range(halvings):
        idx = todo.nonzero()[:, 0]
        cand = x[idx] + t[idx, None] * d[idx]
        with torch.no_grad():
            fc = torch.nan_to_num(fn(cand), nan=math.inf)
        ok = fc <= f[idx] + 1e-4 * t[idx] * gd[idx]
        xn[idx[ok]], fn_[idx[ok]] = cand[ok], fc[ok]
        todo[idx[ok]] = False
        if not todo.any():
            break
        t[todo] *= 0.5
    return xn, fn_, ~todo


def batched_lbfgs(fn, x0: np.ndarray, iters: int = 500, m: int = 10):
    """L-BFGS run independently from every row of x0 [S, P] at once: per-row two-loop recursion
    and Armijo backtracking as batched tensor ops over the rows still improving.
    Returns (x [S, P], f [S])."""
    x = torch.as_tensor(x0, dtype=torch.float64).clone()
    f, g = value_grad(fn, x)
    S, P = x.shape
    hs, hy = torch.zeros(S, m, P, dtype=x.dtype), torch.zeros(S, m, P, dtype=x.dtype)
    rho = torch.zeros(S, m, dtype=x.dtype)
    active = torch.isfinite(f).nonzero()[:, 0]
    for _ in range(iters):
        if len(active) == 0:
            break
        xa, fa, ga = x[active], f[active], g[active]
        d = _two_loop(ga, hs[active], hy[active], rho[active])
        xn, fnew, moved = _armijo(fn, xa, fa, ga, d)
        _, gn = value_grad(fn, xn)
        s, y = xn - xa, gn - ga
        sy = (s * y).sum(-1)
        keep = moved & (sy > 1e-12 * s.norm(dim=-1) * y.norm(dim=-1))
        k = active[keep]
        hs[k] = torch.cat([hs[k, 1:], s[keep, None]], 1)
        hy[k] = torch.cat([hy[k, 1:], y[keep, None]], 1)
        rho[k] = torch.cat([rho[k, 1:], (1 / sy[keep])[:, None]], 1)
        x[active], f[active], g[active] = xn, fnew, torch.where(moved[:, None], gn, ga)
        still = moved & ((fa - fnew) > 1e-13 * fnew.abs()) & (gn.abs().amax(-1) > 1e-13)
        active = active[still]
    return x.numpy(), f.numpy()


def polish(fn, theta0: np.ndarray, bounds=None):
    """scipy L-BFGS-B to tight tolerances from one start (within `bounds`, (lo, hi) per parameter
    with +-inf for none, if given); returns (theta, objective)."""
    def fg(v):
        f, g = value_grad(fn, torch.tensor(v[None]))
        return (f.item(), g.numpy()[0]) if math.isfinite(f.item()) else (1e10, np.zeros_like(v))
    if bounds is not None:
        theta0 = np.clip(theta0, *np.asarray(bounds, dtype=np.float64).T)
    f0 = fg(theta0)[0]
    res = minimize(fg, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 20})
    return (np.asarray(res.x), float(res.fun)) if res.fun <= f0 else (np.asarray(theta0), f0)


@dataclass
class PointFit:
    law: str
    theta: np.ndarray
    objective: float
    n_points: int
    n_starts: int

    @property
    def params(self) -> dict:
        return LAWS[self.law].to_params(self.theta)


def fit_points(law: Law, n, d, loss, starts: int | None = None, extra_starts=(), iters: int = 100,
               polish_top: int = 4) -> PointFit:
    """Batched L-BFGS (`iters` steps) from every start of the law's grid, or from the `starts`
    best of it by objective, plus `extra_starts`; the best `polish_top` end points are then
    polished by scipy's L-BFGS-B and the lowest objective wins."""
    data = Data.of(n, d, loss)
    grid = law.grid()
    if starts is not None and starts < len(grid):
        with torch.no_grad():
            screen = torch.nan_to_num(objective(law, torch.as_tensor(grid), data), nan=math.inf)
        grid = grid[np.argsort(screen.numpy(), kind="stable")[:starts]]
    if len(extra_starts):
        grid = np.concatenate([np.asarray(extra_starts, dtype=np.float64).reshape(-1, grid.shape[1]), grid])
    fn = functools.partial(objective, law, data=data)
    x, f = batched_lbfgs(fn, grid, iters=iters)
    order = [i for i in np.argsort(f, kind="stable") if np.isfinite(f[i])][:polish_top]
    if not order:
        raise UserError(f"--law {law.name}: no start of the grid gives a finite objective on these "
                        f"points; check that losses, N and D are in natural units")
    best = min((polish(fn, x[i]) for i in order), key=lambda r: r[1])
    return PointFit(law.name, best[0], best[1], len(data.L), len(grid))


def predict_points(law: Law, thetas: np.ndarray, n, d) -> np.ndarray:
    """Loss at (n, d) for each theta row: [S, M]."""
    lN, lD = (torch.as_tensor(np.log(np.asarray(n, dtype=np.float64))), torch.as_tensor(np.log(np.asarray(d, dtype=np.float64))))
    with torch.no_grad():
        return law.log_pred(torch.as_tensor(np.atleast_2d(thetas), dtype=torch.float64), lN, lD).exp().numpy()


def bootstrap(law: Law, n, d, loss, fit: PointFit, k: int, seed: int, starts: int = 16) -> np.ndarray:
    """Refit on K resamples of the points (with replacement), each from the full-data optimum
    plus the `starts` best grid points on the resample; returns thetas [K, P]."""
    rng = np.random.default_rng(seed)
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    out = []
    for _ in range(k):
        idx = rng.integers(0, len(n), len(n))
        out.append(fit_points(law, n[idx], d[idx], loss[idx], starts, fit.theta, polish_top=1).theta)
    return np.array(out)


# --- compute-optimal allocation under C = 6 N D --------------------------------------------------
def chinchilla_equivalent(law: Law, theta: np.ndarray) -> dict | None:
    """(E, A, B, alpha, beta) of a law of the form E + A/N^alpha + B/D^beta, else None. Gadre's
    law is one with A = alpha, B = beta 6^(b/2) and both exponents -b."""
    p = law.to_params(theta)
    if law.chinchilla_form:
        return p
    if law.name == "gadre":
        return {"E": p["E"], "A": p["alpha"], "B": p["beta"] * 6 ** (p["b"] / 2), "alpha": -p["b"], "beta": -p["b"]}
    return None


def optimal_closed_form(p: dict, compute) -> tuple[np.ndarray, np.ndarray]:
    """Hoffmann et al. 2022, eq. 4 / Appendix D.2: N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b with
    G = (alpha A / (beta B))^(1/(alpha+beta)), a = beta/(alpha+beta), b = alpha/(alpha+beta)."""
    s = p["alpha"] + p["beta"]
    g = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / s)
    c6 = np.asarray(compute, dtype=np.float64) / 6
    return g * c6 ** (p["beta"] / s), c6 ** (p["alpha"] / s) / g


def optimal_numeric(law: Law, theta: np.ndarray, compute) -> tuple[np.ndarray, np.ndarray]:
    """Minimize L(N, C/(6N)) over log N on a fine grid, refined by a parabola through the minimum."""
    compute = np.atleast_1d(np.asarray(compute, dtype=np.float64))
    lgrid = np.linspace(math.log(1e3), math.log(1e16), 4001)
    n_opt = []
    for c in compute:
        lN = lgrid[lgrid < math.log(c / 6)]
        lL = np.log(predict_points(law, theta, np.exp(lN), c / (6 * np.exp(lN)))[0])
        i = int(np.clip(np.argmin(lL), 1, len(lN) - 2))
        y0, y1, y2 = lL[i - 1:i + 2]
        h = lN[1] - lN[0]
        den = y0 - 2 * y1 + y2
        n_opt.append(math.exp(lN[i] + (0.5 * h * (y0 - y2) / den if den > 0 else 0.0)))
    n_opt = np.array(n_opt)
    return n_opt, compute / (6 * n_opt)


def compute_optimal(law: Law, theta: np.ndarray, compute) -> dict:
    """N_opt, D_opt, tokens per parameter and loss at each compute budget."""
    p = chinchilla_equivalent(law, theta)
    n, d = optimal_closed_form(p, compute) if p else optimal_numeric(law, theta, compute)
    loss = np.array([predict_points(law, theta, [ni], [di])[0, 0] for ni, di in zip(n, d)])
    return {"compute": np.atleast_1d(compute).tolist(), "n_opt": n.tolist(), "d_opt": d.tolist(),
            "tokens_per_param": (d / n).tolist(), "loss": loss.tolist()}


def allocation_exponents(law: Law, theta: np.ndarray) -> dict:
    """N_opt ~ C^a, D_opt ~ C^b (exact for Chinchilla-form laws; a log-log slope otherwise)."""
    p = chinchilla_equivalent(law, theta)
    if p:
        s = p["alpha"] + p["beta"]
        return {"a": p["beta"] / s, "b": p["alpha"] / s}
    c = np.array([1e19, 1e23])
    n, d = optimal_numeric(law, theta, c)
    span = math.log(c[1] / c[0])
    return {"a": math.log(n[1] / n[0]) / span, "b": math.log(d[1] / d[0]) / span}
