"""`cptrain report RUN_DIR`: plots and a summary of a run from its metrics.jsonl, plus the plotting
helpers other commands reuse (`plot_loss` for the demo, `plot_schedule` for `cptrain schedule plot`)."""
import copy
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on headless nodes
import matplotlib.pyplot as plt  # noqa: E402

from ...errors import UserError  # noqa: E402

VAL_PREFIX, TRAIN_PREFIX = "val/", "train/"


def read_metrics(path) -> list:
    """One dict per line of metrics.jsonl; blank lines are skipped, anything else must be a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no metrics file; pass a run directory written by `cptrain train`")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); fix or delete that line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no metrics logged yet; run training for at least one logged step")
    return rows


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(metrics: list, key: str, x: str = "tokens") -> tuple:
    """(xs, ys) of the rows that have a finite `key` (and `x`)."""
    pts = [(r[x], r[key]) for r in metrics if _number(r.get(key)) and _number(r.get(x))]
    return [p[0] for p in pts], [p[1] for p in pts]


def domains(metrics: list, prefix: str = VAL_PREFIX) -> list:
    """Domain names of the `<prefix><domain>` keys logged anywhere in the run."""
    return sorted({k[len(prefix):] for r in metrics for k in r if k.startswith(prefix)})


def _save(fig, ax, path, ylabel: str, title: str) -> Path:
    ax.set_xlabel("tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss(metrics: list, path) -> Path:
    """Training loss and each domain's validation loss against tokens, to a PNG at `path`."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs, ys = series(metrics, "loss")
    if xs:
        ax.plot(xs, ys, label="train", lw=1, alpha=0.8)
    for d in domains(metrics, TRAIN_PREFIX):  # per-domain training loss of mixtures
        tx, ty = series(metrics, TRAIN_PREFIX + d)
        ax.plot(tx, ty, ls="--", lw=0.8, alpha=0.7, label=f"train/{d}")
    for d in domains(metrics):
        vx, vy = series(metrics, VAL_PREFIX + d)
        ax.plot(vx, vy, marker="o", ms=3, label=f"val/{d}")
    if ax.has_data():
        ax.legend()
    return _save(fig, ax, path, "loss", "loss")


def plot_series(metrics: list, key: str, path, ylabel: str, log: bool = False) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    xs, ys = series(metrics, key)
    ax.plot(xs, ys, lw=1)
    if log and any(y > 0 for y in ys):
        ax.set_yscale("log")
    return _save(fig, ax, path, ylabel, key)


def task_names(metrics: list) -> list:
    """Tasks with an `eval/<task>/acc` logged anywhere in the run."""
    return sorted({k.split("/")[1] for r in metrics for k in r if k.startswith("eval/") and k.endswith("/acc")})


def plot_tasks(metrics: list, path) -> Path:
    """Each task's accuracy (solid) and length-normalized accuracy (dashed) against tokens."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for t in task_names(metrics):
        line, = ax.plot(*series(metrics, f"eval/{t}/acc"), marker="o", ms=3, label=f"{t} acc")
        ax.plot(*series(metrics, f"eval/{t}/acc_norm"), ls="--", color=line.get_color(), label=f"{t} acc_norm")
    ax.legend()
    return _save(fig, ax, path, "accuracy", "downstream task accuracy")


def plot_schedule(schedule, path, points: int = 1000) -> Path:
    """LR against tokens for a trainer.schedule.Schedule, with each phase boundary marked."""
    segments = schedule.describe()
    end = max(schedule.total_tokens, segments[-1][2])
    xs = sorted({round(end * i / points) for i in range(points + 1)} | {s[1] for s in segments} | {s[2] for s in segments})
    title = "LR schedule"
    if schedule.rewarms and math.isnan(segments[0][3]):
        # Rewarm from a checkpoint whose LR is only known at run time: draw it from the floor.
        schedule = copy.copy(schedule)
        schedule.on_resume(schedule.origin, schedule.cfg.lr * schedule.cfg.min_lr_ratio)
        segments, title = schedule.describe(), "LR schedule (rewarm drawn from min LR; the run uses the checkpoint's)"
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(xs, [schedule.lr(x) for x in xs], lw=1.5)
    top = max(max(s[3], s[4]) for s in segments)
    for name, t0, _, _, _ in segments:  # names run up each phase's start line, so short phases stay legible
        ax.axvline(t0, color="grey", ls="--", lw=0.7)
        ax.text(t0, top * 1.02, f" {name}", rotation=90, ha="right", va="bottom", fontsize=8)
    ax.axvline(segments[-1][2], color="grey", ls="--", lw=0.7)
    ax.set_ylim(0, top * 1.3)
    return _save(fig, ax, path, "learning rate", title)


def summarize(metrics: list) -> dict:
    """Steps, tokens, first/last/best training loss, last validation loss per domain, mean tokens/s."""
    steps, losses = series(metrics, "loss", x="step")
    _, tps = series(metrics, "tokens_per_s", x="step")
    tokens = [r["tokens"] for r in metrics if _number(r.get("tokens"))]
    out = {
        "steps": max((r["step"] for r in metrics if _number(r.get("step"))), default=0),
        "tokens": max(tokens, default=0),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "best_loss": min(losses) if losses else None,
        "best_loss_step": steps[losses.index(min(losses))] if losses else None,
        "last_val": {d: series(metrics, VAL_PREFIX + d)[1][-1] for d in domains(metrics)
                     if series(metrics, VAL_PREFIX + d)[1]},
        "mean_tokens_per_s": sum(tps) / len(tps) if tps else None,
        "last_tasks": {t: series(metrics, f"eval/{t}/acc")[1][-1] for t in task_names(metrics)},
    }
    mfu = series(metrics, "mfu", x="step")[1]
    if mfu:
        out["mean_mfu"] = sum(mfu) / len(mfu)
    return out


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def format_summary(s: dict, run_dir="") -> str:
    lines = [f"# Run summary{f': {run_dir}' if run_dir else ''}", "",
             f"- steps: {_fmt(s['steps'])}", f"- tokens: {_fmt(s['tokens'])}",
             f"- training loss: first {_fmt(s['first_loss'])}, last {_fmt(s['last_loss'])}, "
             f"best {_fmt(s['best_loss'])} (step {_fmt(s['best_loss_step'])})",
             f"- mean tokens/s: {_fmt(s['mean_tokens_per_s'])}"]
    if "mean_mfu" in s:
        lines.append(f"- mean MFU: {_fmt(s['mean_mfu'])}")
    if s["last_val"]:
        lines += ["", "| domain | last val loss |", "|---|---|"]
        lines += [f"| {d} | {_fmt(v)} |" for d, v in s["last_val"].items()]
    if s.get("last_tasks"):
        lines += ["", "| task | last accuracy |", "|---|---|"]
        lines += [f"| {t} | {_fmt(v)} |" for t, v in s["last_tasks"].items()]
    return "\n".join(lines) + "\n"


def write_report(run_dir, out=None) -> dict:
    """Plots and summary.md/summary.json for RUN_DIR into `out` (default RUN_DIR/report/)."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out) if out else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plot_loss(metrics, out / "loss.png")
    plot_series(metrics, "lr", out / "lr.png", "learning rate")
    plot_series(metrics, "grad_norm", out / "grad_norm.png", "grad norm", log=True)
    plot_series(metrics, "tokens_per_s", out / "throughput.png", "tokens/s")
    if task_names(metrics):
        plot_tasks(metrics, out / "tasks.png")
    summary = summarize(metrics)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(format_summary(summary, str(run_dir)))
    return summary


def main(args) -> int:
    """`cptrain report RUN_DIR [--out DIR]`."""
    summary = write_report(args.run_dir, args.out)
    out = Path(args.out) if args.out else Path(args.run_dir) / "report"
    print(format_summary(summary, args.run_dir), end="")
    print(f"wrote plots and summary to {out}")
    return 0
