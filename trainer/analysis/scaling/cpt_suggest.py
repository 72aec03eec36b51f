"""`cptrain scaling suggest --cpt FIT --max-forgetting X --tokens D` (and `--dcpt FIT`): the replay
fraction (and, with the CPT law, the schedule) that maximizes the new domains' gain while every old
domain's loss at the end stays within X of its loss at the start (a fraction: 0.03 allows a 3% rise).

With the CPT law (Wang et al. 2025) every candidate is predicted step by step: the schedules are the
trainer's own (trainer/schedule.py) - the fitted runs' schedule section with its peak LR scaled by
LR_SCALES and each decay shape of DECAY_SHAPES - crossed with the replay fractions of REPLAYS. The
paper picks peak LR, steps and replay ratio the same way (their Sec. 5, a weighted sum of the two
losses; here the forgetting budget is a constraint, as in the D-CPT paper's usage 1). With the
D-CPT law (Que et al. 2024) only the replay fraction is chosen, for N parameters and D tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ....errors import UserError
from ...schedule import ScheduleConfig, build_schedule
from . import cpt_runs, dcpt

REPLAYS = np.round(np.arange(0, 0.91, 0.01), 2)
LR_SCALES = (0.25, 0.5, 1.0, 1.5, 2.0)  # of the fitted runs' peak LR
DECAY_SHAPES = ("cosine", "linear", "1-sqrt")


@dataclass
class Candidate:
    schedule: ScheduleConfig
    replay: float
    lr: np.ndarray  # per CPT step 0..T
    end: dict  # domain -> predicted loss after the last step
    peak: dict  # domain -> highest predicted loss during the run


def schedule_lrs(cfg: ScheduleConfig, steps: int, batch: int, resume_lr: float) -> np.ndarray:
    """The LR of CPT steps 0..steps (0: no step) as the trainer runs `cfg` from a checkpoint at resume_lr."""
    sched = build_schedule(cfg, steps * batch, batch)
    if sched.rewarms:
        sched.on_resume(0, resume_lr)
    return np.array([0.0] + [sched.lr((s + 1) * batch) for s in range(steps)])


def _schedules(res: dict) -> list[ScheduleConfig]:
    from ...config import from_dict

    base = from_dict(ScheduleConfig, res["schedule"], "schedule", "fit.json")
    peak = max(r["peak_lr"] for r in res["runs"])
    return [replace(base, lr=peak * k, decay_shape=shape) for k in LR_SCALES for shape in DECAY_SHAPES]


def _feasible(c: Candidate, starts: dict, old: list, budget: float) -> bool:
    return all(c.end[d] <= (1 + budget) * starts[d] for d in old)


def _gain(c: Candidate, starts: dict, new: list) -> float:
    return float(np.mean([starts[d] - c.end[d] for d in new])) if new else 0.0


def cpt_candidates(res: dict, steps: int, batch: int, replays) -> list[Candidate]:
    out = []
    resume = res["transfer"]["lr"] if res["transfer"]["known"] else (res["schedule"].get("resume_lr") or 0.0)
    for cfg in _schedules(res):
        lr = schedule_lrs(cfg, steps, batch, resume)
        for r in replays:
            pred = cpt_runs.predict_schedule(res, lr, float(r))
            out.append(Candidate(cfg, float(r), lr, {d: float(v[-1]) for d, v in pred.items()},
                                 {d: float(v.max()) for d, v in pred.items()}))
    return out


def _pick(cands: list, starts: dict, roles: dict, budget: float, where: str):
    old = [d for d, r in roles.items() if r == "old"]
    new = [d for d, r in roles.items() if r == "new"]
    if not old or not new:
        raise UserError(f"{where}: the fit needs an old and a new domain (roles {roles}); fit runs with both evaluated")
    ok = [c for c in cands if _feasible(c, starts, old, budget)]
    if not ok:
        least = min(cands, key=lambda c: max(c.end[d] / starts[d] - 1 for d in old))
        worst = max(least.end[d] / starts[d] - 1 for d in old)
        raise UserError(f"--max-forgetting {budget}: no candidate keeps the old domains within it; the least "
                        f"forgetting is {worst:+.2%} at replay {least.replay:g}; raise --max-forgetting")
    return max(ok, key=lambda c: _gain(c, starts, new)), old, new


def _schedule_keys(cfg: ScheduleConfig) -> str:
    keys = {"kind": cfg.kind, "lr": cfg.lr, "decay_shape": cfg.decay_shape, "min_lr_ratio": cfg.min_lr_ratio,
            "warmup_tokens": cfg.warmup_tokens, "warmup_fraction": cfg.warmup_fraction, "rewarm_from": cfg.rewarm_from}
    return ", ".join(f"schedule.{k}={v:.4g}" if isinstance(v, float) else f"schedule.{k}={v}" for k, v in keys.items())


def _intervals(res: dict, best: Candidate) -> dict:
    """2.5-97.5 percentiles of each domain's end loss over the bootstrap refits, where the fit has them."""
    boots = {d: e["bootstrap"] for d, e in res["domains"].items() if e.get("bootstrap")}
    if not boots:
        return {}
    k = min(len(v) for v in boots.values())
    ends = [cpt_runs.predict_schedule(res, best.lr, best.replay, [len(best.lr) - 1],
                                      params={d: boots[d][i] for d in boots}) for i in range(k)]
    return {d: [float(np.percentile([e[d][0] for e in ends], q)) for q in (2.5, 97.5)] for d in boots}


def suggest_cpt(args) -> int:
    res = cpt_runs.load(args.cpt)
    batch = args.batch_tokens or res["batch_tokens"]
    steps = int(args.tokens // batch)
    if steps < 1:
        raise UserError(f"--tokens {args.tokens:g}: less than one step of {batch} tokens (--batch-tokens)")
    replays = REPLAYS if res["replay_terms"] else [res["runs"][0]["replay"]]
    cands = cpt_candidates(res, steps, batch, replays)
    starts = {d: e["start_loss"] for d, e in res["domains"].items()}
    roles = {d: e["role"] for d, e in res["domains"].items()}
    best, old, new = _pick(cands, starts, roles, args.max_forgetting, "--cpt")
    src = f"CPT law, Wang et al. 2025, arXiv:2505.07796; fit {args.cpt}"
    ci = _intervals(res, best)
    lines = [f"replay fraction: {best.replay:g} (data.replay_fraction)  [{src}]",
             f"schedule: {_schedule_keys(best.schedule)}, train.max_tokens={steps * batch} ({steps} steps of {batch} tokens)  [{src}]"]
    for d in old + new:
        interval = f" (95% interval {ci[d][0]:.4f}-{ci[d][1]:.4f})" if d in ci else ""
        lines.append(f"{roles[d]} domain {d}: {starts[d]:.4f} at the start -> {best.end[d]:.4f} at the end{interval} "
                     f"({best.end[d] / starts[d] - 1:+.2%}; highest during the run {best.peak[d]:.4f})  [{src}]")
    lines += _notes(res, best, steps)
    print("\n".join(lines))
    _plot_cpt(res, best, _baseline(cands, best), Path(args.out or Path(args.cpt).parent / "suggest.png"))
    return 0


def _baseline(cands: list, best: Candidate) -> Candidate:
    """The chosen schedule without replay, drawn beside the choice."""
    return next((c for c in cands if c.schedule == best.schedule and c.replay == 0.0), best)


def _notes(res: dict, best: Candidate, steps: int) -> list:
    seen = [r["replay"] for r in res["runs"]]
    notes = []
    if not min(seen) <= best.replay <= max(seen):
        notes.append(f"note: replay {best.replay:g} is outside the fitted runs' {min(seen):g}-{max(seen):g}: extrapolated")
    longest = max(r["steps"] for r in res["runs"])
    if steps > longest:
        notes.append(f"note: {steps} steps is beyond the fitted runs' longest ({longest}): extrapolated")
    peaks = [r["peak_lr"] for r in res["runs"]]
    if not min(peaks) <= best.schedule.lr <= max(peaks):
        notes.append(f"note: peak LR {best.schedule.lr:.3g} is outside the fitted runs' {min(peaks):.3g}-{max(peaks):.3g}: extrapolated")
    return notes


def _plot_cpt(res: dict, best: Candidate, base: Candidate, path: Path) -> None:
    from .plots import plot_domain_curves

    steps = np.arange(len(best.lr))
    curves = {d: [] for d in res["domains"]}
    for c in ([best, base] if base is not best else [best]):
        for d, v in cpt_runs.predict_schedule(res, c.lr, c.replay).items():
            curves[d].append((f"replay {c.replay:g}, peak LR {c.schedule.lr:.3g}, {c.schedule.decay_shape}", steps, v, None, None))
    plot_domain_curves(curves, path, "suggested CPT: predicted validation losses", "CPT step")
    print(f"wrote {path}")


def suggest_dcpt(args) -> int:
    res = cpt_runs.load(args.dcpt, law="dcpt")
    doms = res["domains"]
    starts = {d: e["start_loss"] for d, e in doms.items()}
    if any(v is None for v in starts.values()):
        raise UserError(f"--dcpt {args.dcpt}: no loss before the first step for {[d for d, v in starts.items() if v is None]}; "
                        f"fit on run directories that evaluated at the start (eval.at_start)")
    n = args.params or doms[next(iter(doms))]["n_range"][1]
    cands = []
    for r in np.round(np.arange(0, 1.0, 0.01), 2):
        end = {d: float(dcpt.predict(np.array(e["theta"]), [n], [args.tokens], [dcpt.domain_r(e, r)])[0, 0])
               for d, e in doms.items()}
        cands.append(Candidate(ScheduleConfig(), float(r), np.zeros(1), end, end))
    best, old, new = _pick(cands, starts, {d: e["role"] for d, e in doms.items()}, args.max_forgetting, "--dcpt")
    src = f"D-CPT law, Que et al. 2024, arXiv:2406.01375; fit {args.dcpt}"
    lines = [f"replay fraction: {best.replay:g} (data.replay_fraction) for N = {n:.4g} parameters, D = {args.tokens:.4g} tokens  [{src}]"]
    lines += [f"{doms[d]['role']} domain {d}: {starts[d]:.4f} at the start -> {best.end[d]:.4f} predicted "
              f"({best.end[d] / starts[d] - 1:+.2%})  [{src}]" for d in old + new]
    print("\n".join(lines))
    return 0
