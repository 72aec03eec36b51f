"""The forgetting report (Gupta et al. 2023; Ibrahim et al. 2024; Guo et al. 2024 on the stability gap):
per-domain validation losses, and downstream task accuracies, of a continual run against its step-0
evaluation, written as RUN/forgetting.md, .json and .png. Reads a run directory only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ...errors import UserError
from .metrics_log import read_metrics
from .report import PASSKEY_PREFIX, _save, passkey_grid, passkey_rows, plot_passkey, plt


def _curve(metrics: list, key: str) -> list[tuple[int, float]]:
    return [(r["tokens"], r[key]) for r in metrics if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def task_rows(metrics: list, tasks: dict[str, str]) -> dict:
    """Per task (name -> role: old, new or ""): start and end accuracy, change = end - start (a drop
    on an old task = forgotten); start None without a step-0 evaluation."""
    out = {}
    for name, role in tasks.items():
        pts = _curve(metrics, f"eval/{name}/acc")
        if not pts:
            raise UserError(f"eval/{name}/acc: never evaluated in this run; check eval.tasks")
        start = pts[0][1] if pts[0][0] == 0 else None
        norm = _curve(metrics, f"eval/{name}/acc_norm")
        out[name] = {"role": role, "start": start, "end": pts[-1][1], "change": None if start is None else pts[-1][1] - start,
                     "best": max(v for _, v in pts), "end_acc_norm": norm[-1][1] if norm else None, "evals": len(pts)}
    return out


def passkey_change(metrics: list) -> dict:
    """Per passkey length: accuracy at the start (None without a step-0 evaluation) and the end, and the change."""
    rows = passkey_rows(metrics)
    if not rows:
        return {}
    first, last = rows[0], rows[-1]
    out = {}
    for n in passkey_grid(last)[0]:
        key = f"{PASSKEY_PREFIX}{n}"
        start = first.get(key) if first.get("tokens") == 0 else None
        out[str(n)] = {"start": start, "end": last.get(key), "change": None if start is None else last[key] - start}
    return out


def forgetting(metrics: list, old: list[str], new: list[str], tasks: dict[str, str] | None = None) -> dict:
    """Per-domain start/worst/best/end validation loss and the old-domain change and new-domain gain.
    The baseline is the evaluation before the first step (tokens 0, `eval.at_start`); without one
    there is nothing to measure a change against, and `baseline` is false with every change None."""
    out = {"baseline": True, "domains": {}, "old": {}, "new": {}, "tasks": task_rows(metrics, tasks or {}),
           "passkey": passkey_change(metrics)}
    for role, names in (("old", old), ("new", new)):
        for name in names:
            pts = _curve(metrics, f"val/{name}")
            if not pts:
                raise UserError(f"val/{name}: never evaluated in this run; check continual.{role}_domains and data.val_domains")
            out["baseline"] &= pts[0][0] == 0
            (t0, start), (t1, end) = pts[0], pts[-1]
            worst = max(pts[1:] or pts, key=lambda p: p[1])
            out["domains"][name] = {"role": role, "start": start, "start_tokens": t0, "end": end, "end_tokens": t1,
                                    "change": end - start, "worst": worst[1], "worst_tokens": worst[0],
                                    "best": min(v for _, v in pts), "evals": len(pts)}
    rows = out["domains"]
    if not out["baseline"]:
        for d in rows.values():
            d["start"] = d["change"] = None
        return out
    if old:
        out["old"] = {"mean_change": _mean(rows[n]["change"] for n in old),
                      "max_rise": max(rows[n]["worst"] - rows[n]["start"] for n in old)}
    if new:
        out["new"] = {"mean_gain": _mean(-rows[n]["change"] for n in new)}
    for role in ("old", "new"):
        changes = [t["change"] for t in out["tasks"].values() if t["role"] == role and t["change"] is not None]
        if changes:
            out[role]["task_acc_change"] = _mean(changes)
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _f(v, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def format_forgetting(rep: dict, run_dir: str = "") -> str:
    lines = [f"# Forgetting report{f': {run_dir}' if run_dir else ''}", "",
             "Validation loss per domain; `change` = end - start (positive on an old domain = forgotten).", "",
             "| domain | role | start | worst (tokens) | end | change |", "|---|---|---|---|---|---|"]
    for name, d in rep["domains"].items():
        lines.append(f"| {name} | {d['role']} | {_f(d['start'])} | {d['worst']:.4f} ({d['worst_tokens']:,}) | "
                     f"{d['end']:.4f} | {_f(d['change'], '+.4f')} |")
    if rep.get("tasks"):
        lines += ["", "Task accuracy (log-likelihood multiple choice); `change` = end - start (negative on an old task = forgotten).",
                  "", "| task | role | start acc | end acc | change | end acc_norm |", "|---|---|---|---|---|---|"]
        for name, t in rep["tasks"].items():
            lines.append(f"| {name} | {t['role'] or '-'} | {_f(t['start'])} | {t['end']:.4f} | {_f(t['change'], '+.4f')} | "
                         f"{_f(t['end_acc_norm'])} |")
    if rep.get("passkey"):
        lines += ["", "Passkey retrieval accuracy by prompt length (heatmap over depths: forgetting_passkey.png).", "",
                  "| length | start | end | change |", "|---|---|---|---|"]
        lines += [f"| {n} | {_f(p['start'])} | {_f(p['end'])} | {_f(p['change'], '+.4f')} |" for n, p in rep["passkey"].items()]
    lines.append("")
    if not rep["baseline"]:
        lines.append("- no baseline: the run has no evaluation before its first step (eval.at_start was false), so no "
                     "change can be measured; run with eval.at_start: true to get one")
    if rep["old"].get("mean_change") is not None:
        lines.append(f"- old domains: mean change {rep['old']['mean_change']:+.4f} from the start; "
                     f"largest rise during the run {rep['old']['max_rise']:+.4f}")
    if rep["new"].get("mean_gain") is not None:
        lines.append(f"- new domains: mean gain {rep['new']['mean_gain']:+.4f} (start - end)")
    for role in ("old", "new"):
        if "task_acc_change" in rep[role]:
            lines.append(f"- {role} tasks: mean accuracy change {rep[role]['task_acc_change']:+.4f}")
    return "\n".join(lines) + "\n"


def plot_forgetting(metrics: list, rep: dict, path: Path, predicted: dict | None = None) -> Path:
    """Each domain's validation loss against tokens: old domains solid, new ones dashed; a fitted law's
    prediction (`predicted`: domain -> (tokens, losses)) dotted in the same colour."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, d in rep["domains"].items():
        xs, ys = zip(*_curve(metrics, f"val/{name}"))
        line, = ax.plot(xs, ys, marker="o", ms=3, ls="-" if d["role"] == "old" else "--", label=f"{name} ({d['role']})")
        if predicted and name in predicted:
            ax.plot(*predicted[name], ls=":", lw=1.5, color=line.get_color(), label=f"{name}: fitted law")
    ax.legend()
    return _save(fig, ax, path, "validation loss", "per-domain validation loss (old: solid, new: dashed)")


def write_forgetting(run_dir, old: list[str], new: list[str], tasks: dict[str, str] | None = None,
                     predicted: dict | None = None) -> dict:
    """RUN/forgetting.json, forgetting.md and forgetting.png from RUN/metrics.jsonl; `predicted`
    (domain -> (tokens, losses) of a fitted law) is drawn beside the measured curves and its end
    values kept in the JSON."""
    run_dir = Path(run_dir)
    if not old and not new:
        raise UserError(f"{run_dir}: no old or new domains to report on; set continual.old_domains / new_domains "
                        "(or --old/--new), or add data.replay / data.val_domains")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    rep = forgetting(metrics, old, new, tasks)
    if predicted:
        rep["predicted_end"] = {d: float(v[1][-1]) for d, v in predicted.items()}
    (run_dir / "forgetting.json").write_text(json.dumps(rep, indent=1))
    (run_dir / "forgetting.md").write_text(format_forgetting(rep, str(run_dir)))
    plot_forgetting(metrics, rep, run_dir / "forgetting.png", predicted)
    if rep["passkey"]:
        plot_passkey(metrics, run_dir / "forgetting_passkey.png")
    return rep
