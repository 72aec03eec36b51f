"""The D-CPT law (Que et al. 2024, "D-CPT Law: Domain-specific Continual Pre-Training Scaling Law for
Large Language Models", NeurIPS; arXiv:2406.01375): the final validation loss of one domain against
model size N, training tokens D and the share r of that domain's corpus in the mixture,

    L(N, D, r) = E + A / N^alpha + B r^eta / D^beta + C / (r + eps)^gamma,

fitted per validation domain (general loss with r = r_general, domain loss with r = r_domain). In a
continual run with replay, the old (general) domain's r is the replay fraction and the new
domain's r is 1 minus it.

Fitting follows the paper where it says how (the form; L-BFGS, with Huber loss and R^2 as the fit
metrics of their Table 1) and Chinchilla's Approach 3 where it does not (the paper builds on it): the
Huber loss (delta 1e-3) of log L - log pred summed over points, in log-sum-exp form over log
amplitudes, batched L-BFGS from the best starts of a grid, then scipy L-BFGS-B with the exponents
in [0, 5] and eps in [1e-6, 1]. The grid is ours (the paper gives none). A variable the points do
not vary is dropped with its term's exponent (one model size: A = 0, alpha = 0, E holds its loss;
one token count: beta = 0).
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ....errors import UserError
from ..metrics_log import read_metrics
from .inputs import _float, _read_csv
from .laws import HUBER_DELTA, batched_lbfgs, huber, polish

NAMES = ("E", "A", "B", "C", "alpha", "beta", "eta", "gamma", "eps")
THETA = ("e", "a", "b", "c", "alpha", "beta", "eta", "gamma", "log_eps")  # fit space
BOUNDS = {"alpha": (0.0, 5.0), "beta": (0.0, 5.0), "eta": (0.0, 5.0), "gamma": (0.0, 5.0),
          "log_eps": (math.log(1e-6), 0.0)}
SCREENED = 16  # grid points L-BFGS starts from
MIN_R = 1e-30  # log r at r = 0: the B term vanishes there (r^eta = 0 for eta > 0)


@dataclass
class Points:
    n: np.ndarray
    d: np.ndarray
    r: np.ndarray
    loss: np.ndarray
    names: list[str] = field(default_factory=list)

    def subset(self, idx) -> "Points":
        return Points(self.n[idx], self.d[idx], self.r[idx], self.loss[idx], [self.names[i] for i in idx])


def log_pred(th: torch.Tensor, lN, lD, r) -> torch.Tensor:
    """log L [S, M] for fit-space rows th [S, 9]."""
    e, a, b, c, alpha, beta, eta, gamma, log_eps = (th[:, i:i + 1] for i in range(9))
    lr = torch.log(r.clamp_min(MIN_R))
    terms = [e.expand(-1, len(r)), a - alpha * lN, torch.where(r > 0, b + eta * lr - beta * lD, -math.inf),
             c - gamma * torch.log(r + log_eps.exp())]
    return torch.logsumexp(torch.stack(torch.broadcast_tensors(*terms)), dim=0)


def to_params(th) -> dict:
    e, a, b, c, alpha, beta, eta, gamma, log_eps = (float(v) for v in th)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "C": math.exp(c), "alpha": alpha, "beta": beta,
            "eta": eta, "gamma": gamma, "eps": math.exp(log_eps)}


def _tensors(p: Points):
    t = [torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (p.n, p.d, p.r, p.loss)]
    return t[0].log(), t[1].log(), t[2], t[3].log()


def _objective(x, base, free, data):
    lN, lD, r, lL = data
    th = base.expand(len(x), -1).clone()
    th[:, free] = x
    return huber(lL - log_pred(th, lN, lD, r)).sum(-1)


def fixed_of(p: Points) -> dict:
    """Fit-space values held for variables the points do not vary."""
    if len(np.unique(p.r)) < 2:
        raise UserError("--law dcpt: every point has the same mixture ratio r; fit runs at two or more replay fractions")
    fixed = {}
    if len(np.unique(p.n)) < 2:
        fixed.update(a=-math.inf, alpha=0.0)
    if len(np.unique(p.d)) < 2:
        fixed["beta"] = 0.0
    return fixed


def _grid(fixed: dict) -> np.ndarray:
    """Our starts (the paper gives none): Chinchilla-like ranges for the amplitudes and exponents."""
    axes = {"e": [-1.0, 0.0, 1.0], "a": [0.0, 5.0, 10.0], "b": [0.0, 5.0, 10.0], "c": [-2.0, -1.0, 0.0],
            "alpha": [0.1, 0.5, 1.0], "beta": [0.1, 0.5, 1.0], "eta": [0.5, 1.0, 2.0], "gamma": [0.1, 0.5, 1.0],
            "log_eps": [math.log(v) for v in (1e-3, 1e-2, 1e-1)]}
    return np.array(list(itertools.product(*([fixed[k]] if k in fixed else v for k, v in axes.items()))))


@dataclass
class Fit:
    theta: np.ndarray
    objective: float
    n_points: int
    fixed: dict

    @property
    def params(self) -> dict:
        return to_params(self.theta)


def fit(p: Points, starts=None) -> Fit:
    fixed = fixed_of(p)
    free = [i for i, k in enumerate(THETA) if k not in fixed]
    if len(p.loss) <= len(free):
        raise UserError(f"--law dcpt: {len(p.loss)} points for {len(free)} free parameters; add runs or evaluations")
    grid = _grid(fixed)
    data = _tensors(p)
    fn = functools.partial(_objective, base=torch.as_tensor(grid[:1]), free=free, data=data)
    if starts is None:
        with torch.no_grad():
            f = torch.nan_to_num(fn(torch.as_tensor(grid[:, free])), nan=math.inf).numpy()
        starts = grid[np.argsort(f, kind="stable")[:SCREENED]][:, free]
    bounds = [BOUNDS.get(THETA[i], (-math.inf, math.inf)) for i in free]
    x, f = batched_lbfgs(fn, np.atleast_2d(starts), iters=200)
    order = [i for i in np.argsort(f, kind="stable") if np.isfinite(f[i])][:1]
    if not order:
        raise UserError("--law dcpt: no start gives a finite objective; check that N, D and losses are in natural units")
    x, obj = min((polish(fn, x[i], bounds=bounds) for i in order), key=lambda t: t[1])
    theta = grid[0].copy()
    theta[free] = x
    return Fit(theta, obj, len(p.loss), fixed)


def predict(theta: np.ndarray, n, d, r) -> np.ndarray:
    """Loss [S, M] at (n, d, r) for fit-space rows theta [S, 9]."""
    lN, lD = (torch.as_tensor(np.log(np.asarray(x, dtype=np.float64))) for x in (n, d))
    with torch.no_grad():
        return log_pred(torch.as_tensor(np.atleast_2d(theta)), lN, lD, torch.as_tensor(np.asarray(r, dtype=np.float64))).exp().numpy()


def bootstrap(p: Points, f: Fit, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    free = [i for i, name in enumerate(THETA) if name not in f.fixed]
    out = []
    for _ in range(k):
        idx = rng.integers(0, len(p.loss), len(p.loss))
        out.append(fit(p.subset(idx), starts=f.theta[free][None]).theta)
    return np.array(out)


# --- inputs -----------------------------------------------------------------------------------------
def points_from_runs(paths) -> tuple[dict, dict, dict]:
    """({domain: Points}, {domain: role}, {domain: mean loss before the first step}) of continual runs:
    a point per evaluation after step 0, at N = run_info.json params, D = the tokens trained then,
    r = the replay fraction (old domains) or 1 minus it (new domains)."""
    from .cpt_runs import read_run

    acc, roles, starts = {}, {}, {}
    for path in map(Path, paths):
        run = read_run(path, pretrain="")
        info = path / "run_info.json"
        if not info.is_file():
            raise UserError(f"{path}: no run_info.json (parameter counts); rerun with a current `cptrain train`")
        n = _float(json.loads(info.read_text()).get("params"), f"{info} params")
        for dom, (steps, losses) in run.evals.items():
            role = roles.setdefault(dom, run.roles[dom])
            r = run.replay if role == "old" else 1 - run.replay
            keep = steps > 0
            acc.setdefault(dom, []).append(Points(np.full(keep.sum(), n), steps[keep] * float(run.batch_tokens),
                                                  np.full(keep.sum(), r), losses[keep],
                                                  [f"{path.name}@{s}" for s in steps[keep]]))
            if steps[0] == 0:
                starts.setdefault(dom, []).append(float(losses[0]))
    pts = {d: Points(*(np.concatenate([getattr(p, k) for p in v]) for k in ("n", "d", "r", "loss")),
                     sum((p.names for p in v), [])) for d, v in acc.items()}
    return pts, roles, {d: float(np.mean(v)) for d, v in starts.items()}


def points_from_csv(path: Path, n_col: str, d_col: str, r_col: str, loss_col: str) -> tuple[dict, dict, dict]:
    """Rows of `n_col, d_col, r_col, loss_col` [, domain, role]: one fit per value of `domain`."""
    rows = _read_csv(path)
    missing = [c for c in (n_col, d_col, r_col, loss_col) if c not in rows[0]]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(rows[0])}); name them with "
                        f"--n-col/--d-col/--r-col/--loss-col")
    acc, roles = {}, {}
    for i, row in enumerate(rows):
        vals = [_float(row[c], f"{path} row {i + 2} column {c}") for c in (n_col, d_col, r_col, loss_col)]
        dom = row.get("domain") or loss_col
        acc.setdefault(dom, []).append((*vals, f"{path.name}:{i + 2}"))
        if row.get("role"):
            roles[dom] = row["role"]
    pts = {d: Points(*(np.array([v[k] for v in vals]) for k in range(4)), [v[4] for v in vals]) for d, vals in acc.items()}
    return pts, roles, {}


def fit_inputs(inputs, args) -> dict:
    """fit.json of the D-CPT law on run directories or one CSV."""
    paths = [Path(p) for p in inputs]
    if all(p.is_dir() for p in paths):
        pts, roles, starts = points_from_runs(paths)
    elif len(paths) == 1:
        pts, roles, starts = points_from_csv(paths[0], args.n_col, args.d_col, args.r_col, args.loss_col)
    else:
        raise UserError("--law dcpt: pass run directories, or a single CSV")
    t0 = time.perf_counter()
    domains = {}
    for dom, p in pts.items():
        for arr, what in ((p.n, "parameter count"), (p.d, "token count"), (p.loss, "loss")):
            if np.any(arr <= 0):
                raise UserError(f"{dom}: a non-positive {what}; N, D and losses must be > 0")
        if np.any((p.r < 0) | (p.r > 1)):
            raise UserError(f"{dom}: a mixture ratio outside [0, 1]")
        f = fit(p)
        entry = {"role": roles.get(dom), "params": f.params, "theta": f.theta.tolist(),
                 "fixed": [k for k in f.fixed], "objective": f.objective, "n_points": f.n_points,
                 "start_loss": starts.get(dom), "n_range": [float(p.n.min()), float(p.n.max())],
                 "points": {"n": p.n.tolist(), "d": p.d.tolist(), "r": p.r.tolist(), "loss": p.loss.tolist()}}
        if args.bootstrap:
            thetas = bootstrap(p, f, args.bootstrap, args.seed)
            rows = [to_params(t) for t in thetas]
            entry["ci"] = {k: [float(np.percentile([r[k] for r in rows], q)) for q in (2.5, 97.5)] for k in NAMES}
            entry["bootstrap"] = thetas.tolist()
        domains[dom] = entry
    return {"law": "dcpt", "params": {d: e["params"] for d, e in domains.items()}, "domains": domains,
            "objective": sum(e["objective"] for e in domains.values()),
            "objective_kind": f"sum of Huber(delta={HUBER_DELTA}) of log-loss residuals",
            "n_points": sum(e["n_points"] for e in domains.values()), "fit_seconds": round(time.perf_counter() - t0, 3),
            "inputs": {"files": [str(p) for p in paths]}}


def domain_r(entry: dict, replay: float) -> float:
    """The domain's own mixture ratio at this replay fraction (a CSV domain without a role: r = replay)."""
    return 1 - replay if entry.get("role") == "new" else replay
