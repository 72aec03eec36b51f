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


def plot_domain_curves(panels: dict, path: Path, title: str, xlabel: str = "step") -> None:
    """One panel per domain: (label, x, predicted, x_measured, measured) lines, measured as dots."""
    fig = Figure(figsize=(6 * len(panels), 4.5))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (dom, curves) in zip(axes, panels.items()):
        for label, x, y, xm, ym in curves:
            line, = ax.plot(x, y, lw=1, label=label)
            if xm is not None:
                ax.scatter(xm, ym, s=8, color=line.get_color())
        ax.set(xlabel=xlabel, ylabel=f"val/{dom}", title=dom)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_cpt_fit(res: dict, inputs, path: Path) -> None:
    """Each run's measured validation losses (dots) and the fitted CPT law at every step (lines)."""
    from . import cpt_runs

    panels = {d: [] for d in res["domains"]}
    for src in inputs:
        run = cpt_runs.read_run(Path(src), pretrain="")  # the fit holds the pretraining's areas
        pred = cpt_runs.predict_schedule(res, run.lr, run.replay)
        for d, (steps, losses) in run.evals.items():
            panels[d].append((f"{run.name} (replay {run.replay:g})", np.arange(len(run.lr)), pred[d], steps, losses))
    plot_domain_curves(panels, path, "CPT law (Wang et al. 2025): fitted lines, measured dots", "CPT step")


def plot_dcpt(res: dict, path: Path) -> None:
    """Per domain: the loss against its mixture ratio r at each (N, D) measured (dots), with the law (lines)."""
    from . import dcpt

    panels = {}
    for dom, e in res["domains"].items():
        pts = e["points"]
        curves, r = [], np.linspace(0, 1, 101)
        for n, d in sorted({(a, b) for a, b in zip(pts["n"], pts["d"])})[-4:]:
            sel = [i for i, (a, b) in enumerate(zip(pts["n"], pts["d"])) if (a, b) == (n, d)]
            y = dcpt.predict(np.array(e["theta"]), np.full(len(r), n), np.full(len(r), d), r)[0]
            curves.append((f"N={n:.3g} D={d:.3g}", r, y, [pts["r"][i] for i in sel], [pts["loss"][i] for i in sel]))
        panels[dom] = curves
    plot_domain_curves(panels, path, "D-CPT law (Que et al. 2024)", "mixture ratio r of the domain")
