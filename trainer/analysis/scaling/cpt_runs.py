"""`--law cpt` on continual runs: read each run's validation curves, LR per step and replay fraction,
find the pretraining it continues, fit the CPT law per domain (trainer/analysis/scaling/cpt.py) and
predict any schedule and replay ratio from the fit.

A run directory gives: `val/<domain>` at its evaluation steps and `lr` per logged step
(metrics.jsonl, interpolated linearly between logged steps); the replay fraction, the old/new roles
of its domains (trainer/continual.py split_domains) and the batch size (config.yaml); the
pretraining it continues from `model.init_from` (or --pretrain): when that is a run directory or one
of its checkpoints, that run's LR up to the checkpoint and its own evaluations enter the fit as the
paper's do; otherwise (an HF model) the pretraining is unknown and S1pt is fitted.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ....errors import UserError
from ...checkpoint import LATEST, step_of
from ..metrics_log import read_metrics
from . import cpt as K
from .inputs import load_fit
from .laws import HUBER_DELTA


@dataclass
class Pretrain:
    name: str
    lr: np.ndarray  # per step 0..T (entry 0: no step, 0)
    evals: dict  # domain -> (steps, losses) at steps 1..T


@dataclass
class CptRun:
    name: str
    replay: float  # r_pt: the fraction of old (replayed) data in the mixture
    lr: np.ndarray  # per CPT step 0..T (entry 0: no step)
    evals: dict  # domain -> (steps, losses), step 0 = the evaluation before the first step
    roles: dict  # domain -> "old" | "new"
    pretrain: Pretrain | None
    batch_tokens: int
    schedule: dict  # the run's schedule section, as plain data


def lr_per_step(rows: list[dict], where: str, last: int | None = None) -> np.ndarray:
    """LR of every step 0..T from the logged rows (step 0: no step, LR 0), linear between rows."""
    pts = sorted((int(r["step"]), float(r["lr"])) for r in rows if "step" in r and r.get("lr") is not None
                 and (last is None or r["step"] <= last))
    if not pts:
        raise UserError(f"{where}/metrics.jsonl: no rows with 'step' and 'lr'; the CPT law needs the LR of every step")
    steps, lrs = zip(*([(0, 0.0)] + [p for p in pts if p[0] > 0]))
    return np.interp(np.arange(steps[-1] + 1), steps, lrs)


def evals_of(rows: list[dict], domains, first: int = 0, last: int | None = None) -> dict:
    out = {}
    for d in domains:
        pts = [(int(r["step"]), float(r[f"val/{d}"])) for r in rows if isinstance(r.get(f"val/{d}"), (int, float))
               and first <= r["step"] and (last is None or r["step"] <= last)]
        if pts:
            out[d] = tuple(np.array(x) for x in zip(*pts))
    return out


def _pretrain_source(src: str) -> tuple[Path, int] | None:
    """(run directory, checkpoint step) of a run directory or one of its checkpoints, else None."""
    p = Path(src)
    if (p / "metrics.jsonl").is_file():
        latest = p / "checkpoints" / LATEST
        if not latest.is_file():
            raise UserError(f"{p}: a run directory without checkpoints/{LATEST}; pass --pretrain RUN/checkpoints/STEP")
        return p, step_of(Path(latest.read_text().strip()))
    if p.parent.name == "checkpoints" and (p.parent.parent / "metrics.jsonl").is_file():
        return p.parent.parent, step_of(p)
    return None


def read_pretrain(src: str, domains) -> Pretrain | None:
    found = _pretrain_source(src) if src else None
    if found is None:
        return None
    run, step = found
    rows = read_metrics(run)
    lr = lr_per_step(rows, str(run), last=step)
    if len(lr) != step + 1:
        raise UserError(f"{run}/metrics.jsonl: the LR is logged up to step {len(lr) - 1}, not to the checkpoint's "
                        f"step {step}; log.interval_steps must reach it")
    return Pretrain(f"{run}@{step}", lr, evals_of(rows, domains, first=1, last=step))


def read_run(path: Path, pretrain: str | None) -> CptRun:
    """pretrain: the pretraining's run directory or checkpoint (None: model.init_from; "": none)."""
    from ...config import load_config
    from ...continual import split_domains

    if not (path / "config.yaml").is_file():
        raise UserError(f"{path}: no config.yaml; pass the directory of a `cptrain train` run")
    cfg = load_config(path / "config.yaml")
    changing = [p.replay_fraction for p in cfg.data.phases if p.replay_fraction is not None
                and p.replay_fraction != cfg.data.replay_fraction]
    if changing:
        raise UserError(f"{path}/config.yaml: data.phases change the replay fraction; the CPT law (Wang et al. 2025, "
                        f"Eq. 8) takes one replay ratio per run: fit runs with a constant data.replay_fraction")
    old, new = split_domains(cfg)
    rows = read_metrics(path)
    roles = {**{d: "old" for d in old}, **{d: "new" for d in new}}
    evals = evals_of(rows, roles)
    if not evals:
        raise UserError(f"{path}: no val/<domain> losses of its old or new domains; set eval.interval_tokens")
    return CptRun(path.name, cfg.data.replay_fraction, lr_per_step(rows, str(path)), evals,
                  {d: r for d, r in roles.items() if d in evals}, read_pretrain(cfg.model.init_from if pretrain is None else pretrain, roles),
                  cfg.train.global_batch_tokens, asdict(cfg.schedule))


def _shared(runs: list[CptRun]) -> tuple[K.Transfer, Pretrain | None, dict]:
    """The pretraining every run continues, and the old/new role of every domain (the same in all)."""
    names = {r.pretrain.name if r.pretrain else None for r in runs}
    if len(names) > 1:
        raise UserError(f"--law cpt: the runs continue different pretrainings ({', '.join(map(str, names))}); fit runs "
                        f"that start from the same checkpoint")
    roles = {}
    for r in runs:
        for d, role in r.roles.items():
            if roles.setdefault(d, role) != role:
                raise UserError(f"{r.name}: domain {d} is {role} here but {roles[d]} in another run; set "
                                f"continual.old_domains/new_domains alike")
    pre = runs[0].pretrain
    return (K.transfer_of(pre.lr) if pre else K.UNKNOWN), pre, roles


def domain_points(runs: list[CptRun], tr: K.Transfer, pre: Pretrain | None, domain: str) -> tuple[K.Points, bool]:
    """Every evaluation of `domain` (the pretraining's included) and whether the pretraining's are."""
    parts = [K.cpt_points(tr, r.lr, r.replay, *r.evals[domain], r.name) for r in runs if domain in r.evals]
    has_pt = pre is not None and domain in pre.evals
    if has_pt:
        parts.append(K.pretrain_points(pre.lr, *pre.evals[domain], pre.name))
    return K.Points.concat(parts), has_pt


def form_of(role: str, replay: bool, tr: K.Transfer, has_pt: bool) -> K.Form:
    """Parameters the data cannot tell apart are held: S1pt when the pretraining is known (its area is
    in the data), C1 without the pretraining's own evaluations (C1 S2pt is then a constant in L0), a1
    and a2 with one replay ratio (their Eq. 4)."""
    fixed = ([("S1pt", 0.0)] if tr.known else []) + ([] if has_pt else [("C1", 0.0)]) \
        + ([] if replay else [("a1", 0.0), ("a2", 0.0)])
    return K.Form(role, replay, tuple(fixed))


def _ci(fit: K.DomainFit, thetas: np.ndarray) -> dict:
    rows = [K.from_fit_space(t) for t in thetas]
    return {n: [float(np.percentile([r[n] for r in rows], q)) for q in (2.5, 97.5)]
            for n in K.NAMES if n not in dict(fit.form.fixed)}


def fit_runs(paths, pretrain: str | None = None, bootstrap: int = 0, seed: int = 0) -> dict:
    """fit.json of the CPT law on these run directories: one fit per validation domain."""
    runs = [read_run(Path(p), pretrain) for p in paths]
    tr, pre, roles = _shared(runs)
    replay = len({r.replay for r in runs}) > 1
    t0 = time.perf_counter()
    domains, total = {}, 0.0
    for d, role in roles.items():
        pts, has_pt = domain_points(runs, tr, pre, d)
        fit = K.fit_domain(pts, form_of(role, replay, tr, has_pt))
        entry = {"role": role, "params": fit.params, "fixed": dict(fit.form.fixed), "objective": fit.objective,
                 "n_points": fit.n_points, "pretrain_points": has_pt,
                 "start_loss": float(K.predict(fit.params, fit.form, K.cpt_points(tr, runs[0].lr, 0.0, [0], [1.0], "0"))[0]),
                 "fit_metrics": _metrics(runs, tr, fit, d)}
        if bootstrap:
            thetas = K.bootstrap(pts, fit, bootstrap, seed)
            entry["ci"], entry["bootstrap"] = _ci(fit, thetas), [K.from_fit_space(t) for t in thetas]
        domains[d], total = entry, total + fit.objective
    return {"law": "cpt", "params": {d: e["params"] for d, e in domains.items()}, "domains": domains,
            "objective": total, "objective_kind": f"sum of Huber(delta={HUBER_DELTA}) of log-loss residuals",
            "n_points": sum(e["n_points"] for e in domains.values()), "fit_seconds": round(time.perf_counter() - t0, 3),
            "replay_terms": replay, "transfer": tr.to_dict(), "pretrain": pre.name if pre else None,
            "batch_tokens": runs[0].batch_tokens, "schedule": runs[0].schedule,
            "runs": [{"name": r.name, "replay": r.replay, "steps": len(r.lr) - 1, "peak_lr": float(r.lr.max())} for r in runs],
            "inputs": {"files": [str(p) for p in paths]}}


def _metrics(runs, tr, fit, domain) -> dict:
    out = {}
    for r in runs:
        if domain in r.evals:
            p = K.cpt_points(tr, r.lr, r.replay, *r.evals[domain], r.name)
            out[r.name] = {"mae": float(np.mean(np.abs(K.predict(fit.params, fit.form, p) - p.loss)))}
    return out


# --- predictions from a fit.json ---------------------------------------------------------------------
def transfer(res: dict) -> K.Transfer:
    return K.Transfer(**res["transfer"])


def forms(res: dict) -> dict:
    return {d: K.Form(e["role"], res["replay_terms"], tuple(e["fixed"].items())) for d, e in res["domains"].items()}


def check_replay(res: dict, replay: float | None, where: str = "--replay") -> float:
    fitted = sorted({r["replay"] for r in res["runs"]})
    if replay is None:
        if len(fitted) > 1:
            raise UserError(f"{where}: give the replay fraction to predict (the fit saw {fitted})")
        return fitted[0]
    if not 0 <= replay < 1:
        raise UserError(f"{where} {replay}: the replay fraction must be in [0, 1)")
    if not res["replay_terms"] and replay != fitted[0]:
        raise UserError(f"{where} {replay}: the fit saw one replay fraction ({fitted[0]}), so it cannot predict "
                        f"another; fit runs at two or more replay fractions")
    return replay


def predict_schedule(res: dict, lr: np.ndarray, replay: float, steps=None, params: dict | None = None) -> dict:
    """Each domain's predicted loss at CPT `steps` (default every step) of the LR per CPT step `lr`."""
    steps = np.arange(len(lr)) if steps is None else np.asarray(steps)
    tr = transfer(res)
    pts = K.cpt_points(tr, lr, replay, steps, np.ones(len(steps)), "predict")
    return {d: K.predict((params or res["params"])[d], f, pts) for d, f in forms(res).items()}


def load(path: str, law: str = "cpt") -> dict:
    """A fit.json of `law` (cpt or dcpt)."""
    res = load_fit(path)
    if res["law"] != law:
        raise UserError(f"{path}: holds the {res['law']} law; pass the fit.json of `cptrain scaling fit ... --law {law}`")
    return res
