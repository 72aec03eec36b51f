"""`cptrain scaling fit` and `cptrain scaling predict`: read inputs, fit, write DIR/fit.json,
print a table, draw the plots."""
from __future__ import annotations

import csv
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ....errors import UserError
from . import curves as C
from . import inputs as I
from . import laws as L
from .inputs import load_fit

COMPUTE_TABLE = [1e18, 1e19, 1e20, 1e21, 1e22, 1e23, 1e24]


def _holdout_mask(pts: I.Points, args) -> np.ndarray:
    """True for the points held out of the fit: the K largest by compute 6ND, and/or N >= a bound."""
    mask = np.zeros(len(pts.n), dtype=bool)
    k = args.holdout_largest or 0
    if k:
        mask[np.argsort(-6 * pts.n * pts.d, kind="stable")[:k]] = True
    if args.holdout_above_n is not None:
        mask |= pts.n >= args.holdout_above_n
    return mask


def _extrapolation(law, theta, pts: I.Points, mask) -> dict:
    held = pts.subset(mask)
    pred = L.predict_points(law, theta, held.n, held.d)[0]
    rel = np.abs(pred - held.loss) / held.loss
    return {"n_heldout": int(mask.sum()), "mean_rel_error": float(rel.mean()), "max_rel_error": float(rel.max()),
            "points": [{"name": nm, "n": float(n), "d": float(d), "loss": float(l), "pred": float(p), "rel_error": float(r)}
                       for nm, n, d, l, p, r in zip(held.names, held.n, held.d, held.loss, pred, rel)]}


def _ci(law, thetas: np.ndarray) -> dict:
    """2.5-97.5 percentile intervals of the published parameters and the allocation exponents."""
    rows = [dict(law.to_params(t), **{f"alloc_{k}": v for k, v in L.allocation_exponents(law, t).items()})
            for t in thetas]
    return {k: [float(np.percentile([r[k] for r in rows], 2.5)), float(np.percentile([r[k] for r in rows], 97.5))]
            for k in rows[0]}


def _fit_points(args, out: Path) -> dict:
    law = L.get_law(args.law)
    pts = I.read_points(args.inputs, law.name, args.n_col, args.d_col, args.loss_col, args.where or ())
    held = _holdout_mask(pts, args)
    train = pts.subset(~held)
    if len(train.n) < L.MIN_POINTS[law.name]:
        raise UserError(f"{', '.join(args.inputs)}: {len(train.n)} points to fit (after hold-out) but "
                        f"--law {law.name} needs at least {L.MIN_POINTS[law.name]}; add runs")
    t0 = time.perf_counter()
    fit = L.fit_points(law, train.n, train.d, train.loss, starts=args.starts or None)
    res = {"law": law.name, "params": {k: float(v) for k, v in fit.params.items()}, "objective": fit.objective,
           "objective_kind": "sum of squared loss residuals" if law.objective == "lsq"
           else f"sum of Huber(delta={L.HUBER_DELTA}) of log-loss residuals",
           "n_points": fit.n_points, "n_starts": fit.n_starts, "theta": fit.theta.tolist(),
           "fit_seconds": round(time.perf_counter() - t0, 3),
           "inputs": {"files": list(args.inputs), "n_col": args.n_col, "d_col": args.d_col,
                      "loss_col": args.loss_col, "where": args.where or []},
           "compute_optimal": dict(L.allocation_exponents(law, fit.theta),
                                   table=L.compute_optimal(law, fit.theta, COMPUTE_TABLE))}
    if held.any():
        res["extrapolation"] = _extrapolation(law, fit.theta, pts, held)
    if args.bootstrap:
        thetas = L.bootstrap(law, train.n, train.d, train.loss, fit, args.bootstrap, args.seed)
        res["ci"] = _ci(law, thetas)
        res["bootstrap"] = {"k": args.bootstrap, "seed": args.seed, "thetas": thetas.tolist()}
    from . import plots
    plots.plot_points(law, fit.theta, pts, held, out)
    return res


def _fit_curves(args, out: Path) -> dict:
    if args.bootstrap:
        raise UserError(f"--bootstrap: applies to the (N, D) laws, not --law {args.law}; drop it")
    curves = I.read_curves(args.inputs)
    t0 = time.perf_counter()
    cf = C.fit_curves(args.law, curves)
    seconds = round(time.perf_counter() - t0, 3)
    metrics = {c.name: C.curve_metrics(C.predict_curve(cf.law, cf.params, c, c.steps), c.loss) for c in curves}
    from . import plots
    plots.plot_curves(cf.law, cf.params, curves, out / "curves.png")
    return {"law": cf.law, "params": cf.params, "objective": cf.objective,
            "objective_kind": f"sum of Huber(delta={L.HUBER_DELTA}) of log-loss residuals",
            "n_points": cf.n_points, "fit_seconds": seconds,
            "inputs": {"files": list(args.inputs)}, "fit_metrics": metrics}


def _print_fit(res: dict) -> None:
    print(f"law {res['law']}: {res['n_points']} points, objective {res['objective']:.6g} "
          f"({res['objective_kind']}), {res['fit_seconds']} s")
    ci = res.get("ci", {})
    for k, v in res["params"].items():
        lo_hi = f"  [{ci[k][0]:.5g}, {ci[k][1]:.5g}]" if k in ci else ""
        print(f"  {k:>8} = {v:<12.6g}{lo_hi}")
    if "compute_optimal" in res:
        co = res["compute_optimal"]
        print(f"  compute-optimal: N_opt ~ C^{co['a']:.3f}, D_opt ~ C^{co['b']:.3f}")
        print(f"  {'C':>9} {'N_opt':>10} {'D_opt':>10} {'D/N':>7} {'loss':>7}")
        t = co["table"]
        for row in zip(t["compute"], t["n_opt"], t["d_opt"], t["tokens_per_param"], t["loss"]):
            print("  {:>9.3g} {:>10.4g} {:>10.4g} {:>7.1f} {:>7.4f}".format(*row))
    if "extrapolation" in res:
        ex = res["extrapolation"]
        print(f"  extrapolation to {ex['n_heldout']} held-out runs: mean relative error {ex['mean_rel_error']:.4%}")
        for p in ex["points"]:
            print(f"    {p['name']}: N={p['n']:.4g} D={p['d']:.4g} loss {p['loss']:.4f} pred {p['pred']:.4f} ({p['rel_error']:.3%})")
    for name, m in res.get("fit_metrics", {}).items():
        print(f"  {name}: MAE {m['mae']:.5f}  R2 {m['r2']:.5f}")


@contextmanager
def _one_thread():
    """Many small batched ops: intra-op threads only add contention (10x slower on a busy CPU)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _fit_cpt(args, out: Path) -> dict:
    """The continual-pretraining laws: one fit per validation domain (trainer/analysis/scaling/cpt.py, dcpt.py)."""
    from . import cpt_runs, dcpt, plots

    if args.law == "dcpt":
        res = dcpt.fit_inputs(args.inputs, args)
        plots.plot_dcpt(res, out / "fit.png")
        return res
    if not all(Path(p).is_dir() for p in args.inputs):
        raise UserError(f"--law cpt: pass continual run directories (got {', '.join(args.inputs)})")
    res = cpt_runs.fit_runs(args.inputs, args.pretrain, args.bootstrap, args.seed)
    plots.plot_cpt_fit(res, args.inputs, out / "curves.png")
    return res


def _print_domains(res: dict) -> None:
    print(f"law {res['law']}: {res['n_points']} points, objective {res['objective']:.6g} "
          f"({res['objective_kind']}), {res['fit_seconds']} s")
    for dom, e in res["domains"].items():
        print(f"  {dom} ({e.get('role') or 'no role'}): {e['n_points']} points, objective {e['objective']:.4g}"
              + (f", held: {', '.join(map(str, e['fixed']))}" if e["fixed"] else ""))
        ci = e.get("ci", {})
        for k, v in e["params"].items():
            lo_hi = f"  [{ci[k][0]:.5g}, {ci[k][1]:.5g}]" if k in ci else ""
            print(f"    {k:>6} = {v:<12.6g}{lo_hi}")
        for run, m in e.get("fit_metrics", {}).items():
            print(f"    {run}: MAE {m['mae']:.5f}")


def fit(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _one_thread():
        if args.law in ("cpt", "dcpt"):
            res = _fit_cpt(args, out)
        else:
            res = _fit_curves(args, out) if args.law in C.CURVE_LAWS else _fit_points(args, out)
    (out / "fit.json").write_text(json.dumps(res, indent=1))
    (_print_domains if res["law"] in ("cpt", "dcpt") else _print_fit)(res)
    print(f"wrote {out / 'fit.json'} and plots in {out}")
    return 0


def _predict_curve(res: dict, args) -> int:
    if not args.curve or not args.out:
        raise UserError(f"--fit {args.fit} holds a {res['law']} loss-curve law: pass --curve SCHEDULE.csv --out PRED.csv")
    sched = I.curve_from_csv(Path(args.curve))
    pred = C.predict_curve(res["law"], res["params"], sched)
    lr = sched.lr[sched.row_steps]
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", "loss_pred"])
        for s, l, p in zip(sched.row_steps, lr, pred):
            w.writerow([int(s), repr(float(l)), repr(float(p)) if math.isfinite(p) else ""])
    print(f"wrote {len(pred)} rows to {args.out}")
    if len(sched.steps):
        m = C.curve_metrics(C.predict_curve(res["law"], res["params"], sched, sched.steps), sched.loss)
        print("against the logged losses: " + ", ".join(f"{k} {v:.5g}" for k, v in m.items()))
    from . import plots
    plots.plot_curves(res["law"], res["params"], [sched], Path(args.out).with_suffix(".png"))
    return 0


def _predict_points(res: dict, args) -> int:
    law = L.get_law(res["law"])
    theta = np.array(res["theta"])
    if args.compute:
        co = L.compute_optimal(law, theta, args.compute)
        print(f"{'C':>9} {'N_opt':>10} {'D_opt':>10} {'D/N':>7} {'loss':>7}")
        for row in zip(co["compute"], co["n_opt"], co["d_opt"], co["tokens_per_param"], co["loss"]):
            print("{:>9.3g} {:>10.4g} {:>10.4g} {:>7.1f} {:>7.4f}".format(*row))
    if not (args.n or args.d):
        if not args.compute:
            raise UserError(f"--fit {args.fit}: pass --n N... --d D... (or --compute C...) to predict")
        return 0
    if not (args.n and args.d) or (len(args.n) != len(args.d) and 1 not in (len(args.n), len(args.d))):
        raise UserError("--n/--d: give both, of equal length (or one value to pair with every other)")
    n, d = np.broadcast_arrays(np.array(args.n, dtype=float), np.array(args.d, dtype=float))
    if np.any(n <= 0) or np.any(d <= 0):
        raise UserError("--n/--d: parameter and token counts must be > 0")
    pred = L.predict_points(law, theta, n, d)[0]
    boot = res.get("bootstrap", {}).get("thetas")
    lo, hi = (np.percentile(L.predict_points(law, np.array(boot), n, d), q, axis=0) for q in (2.5, 97.5)) if boot \
        else (np.full_like(pred, np.nan),) * 2
    rows = list(zip(n, d, pred, lo, hi))
    print(f"{'N':>10} {'D':>10} {'loss':>8} {'95% interval':>20}")
    for r in rows:
        print("{:>10.4g} {:>10.4g} {:>8.4f} {:>20}".format(*r[:3], f"[{r[3]:.4f}, {r[4]:.4f}]" if boot else "(no bootstrap)"))
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["params", "tokens", "loss_pred", "loss_lo", "loss_hi"])
            w.writerows([[repr(float(x)) for x in r] for r in rows])
    return 0


def _predict_cpt(res: dict, args) -> int:
    """`--law cpt`: each domain's loss at every row of a CPT schedule at a replay fraction."""
    from . import cpt_runs, plots

    if not args.curve or not args.out:
        raise UserError(f"--fit {args.fit} holds the CPT law: pass --curve SCHEDULE.csv (the CPT's step,lr from step 0) "
                        f"--out PRED.csv [--replay R]")
    replay = cpt_runs.check_replay(res, args.replay)
    sched = I.curve_from_csv(Path(args.curve))
    pred = cpt_runs.predict_schedule(res, sched.lr, replay, sched.row_steps)
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", *(f"loss_pred/{d}" for d in pred)])
        for i, s in enumerate(sched.row_steps):
            w.writerow([int(s), repr(float(sched.lr[s])), *(repr(float(v[i])) for v in pred.values())])
    print(f"wrote {len(sched.row_steps)} rows to {args.out} (replay {replay})")
    for d, v in pred.items():
        print(f"  {d} ({res['domains'][d]['role']}): {v[0]:.4f} at step {int(sched.row_steps[0])} -> {v[-1]:.4f} "
              f"at step {int(sched.row_steps[-1])}")
    steps = np.arange(len(sched.lr))
    plots.plot_domain_curves({d: [(f"replay {replay}", steps, v, None, None)] for d, v in
                              cpt_runs.predict_schedule(res, sched.lr, replay).items()},
                             Path(args.out).with_suffix(".png"), "CPT law prediction", "CPT step")
    return 0


def _predict_dcpt(res: dict, args) -> int:
    from . import dcpt

    if not (args.n and args.d) or args.replay is None:
        raise UserError(f"--fit {args.fit} holds the D-CPT law: pass --n N --d D --replay R")
    if not 0 <= args.replay <= 1:
        raise UserError(f"--replay {args.replay}: the replay fraction must be in [0, 1]")
    n, d = np.broadcast_arrays(np.array(args.n, dtype=float), np.array(args.d, dtype=float))
    print(f"{'domain':>12} {'r':>6} {'N':>10} {'D':>10} {'loss':>8} {'95% interval':>20}")
    for dom, e in res["domains"].items():
        r = np.full(len(n), dcpt.domain_r(e, args.replay))
        pred = dcpt.predict(np.array(e["theta"]), n, d, r)[0]
        boot = e.get("bootstrap")
        lo, hi = ((np.percentile(dcpt.predict(np.array(boot), n, d, r), q, axis=0) for q in (2.5, 97.5))
                  if boot else (pred * np.nan, pred * np.nan))
        for row in zip(n, d, pred, lo, hi):
            ci = f"[{row[3]:.4f}, {row[4]:.4f}]" if boot else "(no bootstrap)"
            print(f"{dom:>12} {r[0]:>6.3f} {row[0]:>10.4g} {row[1]:>10.4g} {row[2]:>8.4f} {ci:>20}")
    return 0


def predict(args) -> int:
    res = load_fit(args.fit)
    with _one_thread():
        if res["law"] == "cpt":
            return _predict_cpt(res, args)
        if res["law"] == "dcpt":
            return _predict_dcpt(res, args)
        return _predict_curve(res, args) if res["law"] in C.CURVE_LAWS else _predict_points(res, args)
