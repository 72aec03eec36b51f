"""PNG plots of scaling-law fits: fit against data, isoFLOP curves, the compute-optimal frontier,
and predicted against observed loss curves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

from . import curves as C
from . import laws as L


def plot_points(law: L.Law, theta: np.ndarray, pts, held: np.ndarray, out: Path) -> None:
    """out/fit.png (observed vs predicted), out/isoflop.png, out/frontier.png."""
    pred = L.predict_points(law, theta, pts.n, pts.d)[0]
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.scatter(pts.loss[~held], pred[~held], s=12, label="fitted")
    if held.any():
        ax.scatter(pts.loss[held], pred[held], s=30, marker="x", color="red", label="held out")
    lim = [min(pts.loss.min(), pred.min()), max(pts.loss.max(), pred.max())]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set(xlabel="observed loss", ylabel="predicted loss", title=f"{law.name} fit")
    ax.legend()
    fig.savefig(out / "fit.png", dpi=110, bbox_inches="tight")

    compute = 6 * pts.n * pts.d
    budgets = np.unique(np.round(np.log10(compute), 1))
    budgets = 10 ** budgets[:: max(1, len(budgets) // 6)]
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for c in budgets:
        ns = np.logspace(np.log10(pts.n.min()) - 0.3, np.log10(pts.n.max()) + 0.3, 200)
        line, = ax.plot(ns, L.predict_points(law, theta, ns, c / (6 * ns))[0], lw=1, label=f"C={c:.2g}")
        near = np.abs(np.log10(compute / c)) < 0.05
        ax.scatter(pts.n[near], pts.loss[near], s=10, color=line.get_color())
        best = L.compute_optimal(law, theta, [c])
        ax.scatter(best["n_opt"], best["loss"], s=40, marker="*", color=line.get_color())
    ax.set_ylim(pts.loss.min() - 0.2, pts.loss.max() + 0.5)
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss",
           title="isoFLOP curves (C = 6ND); stars: compute-optimal N")
    ax.legend(fontsize=7)
    fig.savefig(out / "isoflop.png", dpi=110, bbox_inches="tight")

    cs = np.logspace(np.log10(compute.min()), np.log10(compute.max()) + 2, 30)
    co = L.compute_optimal(law, theta, cs)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    ax.plot(cs, co["n_opt"], label="N_opt")
    ax.plot(cs, co["d_opt"], label="D_opt")
    ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", title="compute-optimal frontier")
    ax.legend()
    fig.savefig(out / "frontier.png", dpi=110, bbox_inches="tight")


def plot_curves(law: str, params: dict, curves: list, path: Path) -> None:
    """Logged losses (dots) and the law's prediction (line) for each curve, with the LR below."""
    fig = Figure(figsize=(7, 6))
    ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for c in curves:
        steps = np.unique(np.concatenate([c.row_steps, c.steps]))
        steps = steps[c.area[steps] > 0]
        line, = ax.plot(steps, C.predict_curve(law, params, c, steps), lw=1, label=Path(c.name).stem)
        if len(c.steps):
            ax.scatter(c.steps, c.loss, s=4, color=line.get_color())
        ax_lr.plot(np.arange(len(c.lr)), c.lr, lw=1, color=line.get_color())
    ax.set(ylabel="loss", title=f"{law}: predicted (lines) vs logged (dots)")
    lo = min([c.loss.min() for c in curves if len(c.loss)] or [0])
    if lo:
        ax.set_ylim(lo - 0.05, lo + 1.0)
    ax.legend(fontsize=7)
    ax_lr.set(xlabel="step", ylabel="lr")
    fig.savefig(path, dpi=110, bbox_inches="tight")
