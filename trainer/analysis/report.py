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
from .metrics_log import TRAIN_PREFIX, VAL_PREFIX, domains, read_metrics  # noqa: E402

def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(metrics: list, key: str, x: str = "tokens") -> tuple:
    """(xs, ys) of the rows that have a finite `key` (and `x`)."""
    pts = [(r[x], r[key]) for r in metrics if _number(r.get(key)) and _number(r.get(x))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig, ax, path, ylabel: str, title: str, xlabel: str = "tokens") -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _write(fig, path)


def _write(fig, path) -> Path:
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


def position_losses(row: dict) -> dict:
    """{domain: {"pos<lo>-<hi>": loss}} of one metrics row's `val/<domain>/pos<lo>-<hi>` keys, buckets in order."""
    out: dict = {}
    for k, v in row.items():
        domain, _, bucket = k[len(VAL_PREFIX):].partition("/")
        if k.startswith(VAL_PREFIX) and bucket.startswith("pos") and _number(v):
            out.setdefault(domain, {})[bucket] = v
    return {d: dict(sorted(b.items(), key=lambda kv: int(kv[0][3:].split("-")[0]))) for d, b in sorted(out.items())}


def plot_positions(metrics: list, path) -> Path:
    """Validation loss per position bucket, at the first (dashed) and last (solid) evaluation of each domain."""
    rows = [r for r in metrics if position_losses(r)]
    fig, ax = plt.subplots(figsize=(8, 4))
    for d, last in position_losses(rows[-1]).items():
        line, = ax.plot(list(last), list(last.values()), marker="o", label=f"{d} at {rows[-1].get('tokens', 0):,} tokens")
        first = position_losses(rows[0]).get(d)
        if len(rows) > 1 and first:
            ax.plot(list(first), list(first.values()), marker="o", ls="--", color=line.get_color(),
                    label=f"{d} at {rows[0].get('tokens', 0):,} tokens")
    ax.legend()
    return _save(fig, ax, path, "validation loss", "validation loss by token position", xlabel="positions in the row")


PASSKEY_PREFIX = "eval/passkey/"


def passkey_grid(row: dict) -> tuple[list[int], list[str], list[list[float]]]:
    """(lengths, depths, accuracy[length][depth]) of one metrics row's `eval/passkey/<length>/<depth>` keys."""
    cells = {}
    for k, v in row.items():
        parts = k[len(PASSKEY_PREFIX):].split("/")
        if k.startswith(PASSKEY_PREFIX) and len(parts) == 2 and _number(v):
            cells[int(parts[0]), parts[1]] = v
    lengths, depths = sorted({n for n, _ in cells}), sorted({d for _, d in cells}, key=float)
    return lengths, depths, [[cells.get((n, d), math.nan) for d in depths] for n in lengths]


def passkey_rows(metrics: list) -> list:
    """The evaluations that scored passkey prompts."""
    return [r for r in metrics if passkey_grid(r)[0]]


def plot_passkey(metrics: list, path) -> Path:
    """Passkey accuracy as a length x depth heatmap: the first and the last evaluation side by side."""
    rows = passkey_rows(metrics)
    panels = [rows[0], rows[-1]] if len(rows) > 1 else rows[-1:]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.5 + 4.5 * len(panels), 3.8), squeeze=False)
    for ax, row in zip(axes[0], panels):
        lengths, depths, grid = passkey_grid(row)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", origin="lower", aspect="auto")
        ax.set_xticks(range(len(depths)), depths)
        ax.set_yticks(range(len(lengths)), [f"{n:,}" for n in lengths])
        for i, values in enumerate(grid):
            for j, v in enumerate(values):
                ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("depth of the key (0: first, 1: last)")
        ax.set_ylabel("prompt length (tokens)")
        ax.set_title(f"passkey accuracy at {row.get('tokens', 0):,} tokens trained")
    fig.colorbar(image, ax=axes[0][-1], label="accuracy")
    return _write(fig, path)


def plot_routers(metrics: list, path) -> Path:
    """A mixture of experts' routers against tokens: the most loaded expert's share over an even share
    (1: balanced) in each layer, and the balancing and z-losses."""
    fig, (ax, losses) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    layers = sorted({k.split("/")[1] for r in metrics for k in r if k.startswith("moe/layer") and k.endswith("/load_max")},
                    key=lambda name: int(name.removeprefix("layer")))
    for name in layers:
        ax.plot(*series(metrics, f"moe/{name}/load_max"), lw=0.8, label=name)
    ax.plot(*series(metrics, "moe/load_max"), lw=1.5, color="black", label="max over layers")
    ax.axhline(1.0, color="grey", ls="--", lw=0.7)
    ax.set_ylabel("max load / even share")
    ax.legend(fontsize=6, ncol=4)
    for key in ("moe/aux_loss", "moe/z_loss"):
        losses.plot(*series(metrics, key), lw=1, label=key.removeprefix("moe/"))
    losses.legend()
    return _save(fig, losses, path, "router loss", "routers")


def plot_expert_load(path_jsonl, path) -> Path | None:
    """Histogram of every expert's share of its layer's assignments, over an even share, in the last
    line of expert_load.jsonl (written at each evaluation and at the end); None without one."""
    lines = [json.loads(line) for line in Path(path_jsonl).read_text().splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1]
    ratios = [share * len(layer) for layer in last["share"] for share in layer]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.hist(ratios, bins=min(60, max(10, len(ratios) // 4)))
    ax.axvline(1.0, color="grey", ls="--", lw=0.7)
    at = f"at {last['tokens']:,} tokens" if last.get("tokens") else "at the end"
    ax.set_title(f"expert load {at}: {len(last['share'])} layers x {len(last['share'][0])} experts")
    ax.set_xlabel("share of the layer's assignments / even share")
    ax.set_ylabel("experts")
    return _write(fig, path)


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
    if positions := [r for r in metrics if position_losses(r)]:
        out["last_val_positions"] = position_losses(positions[-1])
    if passkey := passkey_rows(metrics):
        lengths = passkey_grid(passkey[-1])[0]
        out["last_passkey"] = {str(n): passkey[-1][f"{PASSKEY_PREFIX}{n}"] for n in lengths if f"{PASSKEY_PREFIX}{n}" in passkey[-1]}
    mfu = series(metrics, "mfu", x="step")[1]
    if mfu:
        out["mean_mfu"] = sum(mfu) / len(mfu)
    load = series(metrics, "moe/load_max", x="step")[1]
    if load:
        out["last_load_max"] = load[-1]
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
    if "last_load_max" in s:
        lines.append(f"- most loaded expert at the end: {_fmt(s['last_load_max'])} x an even share")
    if s["last_val"]:
        lines += ["", "| domain | last val loss |", "|---|---|"]
        lines += [f"| {d} | {_fmt(v)} |" for d, v in s["last_val"].items()]
    if s.get("last_tasks"):
        lines += ["", "| task | last accuracy |", "|---|---|"]
        lines += [f"| {t} | {_fmt(v)} |" for t, v in s["last_tasks"].items()]
    if s.get("last_val_positions"):
        lines += ["", "| domain | position | last val loss |", "|---|---|---|"]
        lines += [f"| {d} | {b} | {_fmt(v)} |" for d, buckets in s["last_val_positions"].items() for b, v in buckets.items()]
    if s.get("last_passkey"):
        lines += ["", "| passkey length | last accuracy |", "|---|---|"]
        lines += [f"| {n} | {_fmt(v)} |" for n, v in s["last_passkey"].items()]
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
    if any(position_losses(r) for r in metrics):
        plot_positions(metrics, out / "positions.png")
    if passkey_rows(metrics):
        plot_passkey(metrics, out / "passkey.png")
    if series(metrics, "moe/load_max")[0]:  # a mixture of experts (trainer/moe.py)
        plot_routers(metrics, out / "routers.png")
    if (run_dir / "expert_load.jsonl").is_file():
        plot_expert_load(run_dir / "expert_load.jsonl", out / "expert_load.png")
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
