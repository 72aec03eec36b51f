"""Continual pretraining: anneal branches off a running main run, and the forgetting report.

Anneal branch (Hu et al. 2024, WSD; Ibrahim et al. 2024, infinite schedules): a checkpoint of a
constant (or power) phase becomes a finished model by a short decay run in its own directory. The
branch gets hard links to the parent's checkpoint files and resumes them exactly (weights,
optimizer, data position, RNG, the parent's LR), so the main run is never touched: the parent's
files are only read, and a link the branch later prunes is the branch's own.

Forgetting report (Gupta et al. 2023; Ibrahim et al. 2024; Guo et al. 2024 on the stability gap):
per-domain validation losses of a continual run against its step-0 evaluation, written at the end
of the run as RUN/forgetting.md, .json and .png.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from launch.errors import UserError
from trainer import checkpoint as ckpt
from trainer.schedule import DECAY_SHAPES, anneal_branch, build_schedule

BRANCH_FILE = "branch.json"


@dataclass
class ContinualSection:
    old_domains: list[str] = field(default_factory=list)  # validation domains that measure forgetting; empty: replay + val_domains
    new_domains: list[str] = field(default_factory=list)  # validation domains that measure adaptation; empty: data.domains
    report: Literal["auto", "on", "off"] = "auto"  # forgetting report at the end: auto = when model.init_from is set

    def check(self, data, src: str) -> None:
        """Names must be validation domains of `data` (a DataConfig): training, replay or val_domains."""
        known = [d.name for d in [*data.domains, *data.replay, *data.val_domains]]
        for key in ("old_domains", "new_domains"):
            unknown = [n for n in getattr(self, key) if n not in known]
            if unknown:
                raise UserError(f"{src}: continual.{key} names {unknown}, which are not validation domains; use some of {known}")


def split_domains(cfg) -> tuple[list[str], list[str]]:
    """(old, new) validation domain names of a TrainConfig: as configured, else old = replay and
    val_domains (the data continual pretraining must not forget), new = the training domains."""
    train = [d.name for d in cfg.data.domains]
    old = cfg.continual.old_domains or [d.name for d in [*cfg.data.replay, *cfg.data.val_domains] if d.name not in train]
    new = cfg.continual.new_domains or [n for n in train if n not in old]
    return list(dict.fromkeys(old)), list(dict.fromkeys(new))


# ---------------------------------------------------------------- the forgetting report

def _curve(metrics: list, name: str) -> list[tuple[int, float]]:
    key = f"val/{name}"
    return [(r["tokens"], r[key]) for r in metrics if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def forgetting(metrics: list, old: list[str], new: list[str]) -> dict:
    """Per-domain start/worst/best/end validation loss and the old-domain change and new-domain gain.
    The baseline is the first evaluation (step 0 with eval.at_start)."""
    out = {"domains": {}, "old": {}, "new": {}}
    for role, names in (("old", old), ("new", new)):
        for name in names:
            pts = _curve(metrics, name)
            if not pts:
                raise UserError(f"val/{name}: never evaluated in this run; check continual.{role}_domains and data.val_domains")
            (t0, start), (t1, end) = pts[0], pts[-1]
            worst = max(pts[1:] or pts, key=lambda p: p[1])
            out["domains"][name] = {"role": role, "start": start, "start_tokens": t0, "end": end, "end_tokens": t1,
                                    "change": end - start, "worst": worst[1], "worst_tokens": worst[0],
                                    "best": min(v for _, v in pts), "evals": len(pts)}
    rows = out["domains"]
    if old:
        out["old"] = {"mean_change": _mean(rows[n]["change"] for n in old),
                      "max_rise": max(rows[n]["worst"] - rows[n]["start"] for n in old)}
    if new:
        out["new"] = {"mean_gain": _mean(-rows[n]["change"] for n in new)}
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def format_forgetting(rep: dict, run_dir: str = "") -> str:
    lines = [f"# Forgetting report{f': {run_dir}' if run_dir else ''}", "",
             "Validation loss per domain; `change` = end - start (positive on an old domain = forgotten).", "",
             "| domain | role | start | worst (tokens) | end | change |", "|---|---|---|---|---|---|"]
    for name, d in rep["domains"].items():
        lines.append(f"| {name} | {d['role']} | {d['start']:.4f} | {d['worst']:.4f} ({d['worst_tokens']:,}) | "
                     f"{d['end']:.4f} | {d['change']:+.4f} |")
    lines.append("")
    if rep["old"]:
        lines.append(f"- old domains: mean change {rep['old']['mean_change']:+.4f} from the start; "
                     f"largest rise during the run {rep['old']['max_rise']:+.4f}")
    if rep["new"]:
        lines.append(f"- new domains: mean gain {rep['new']['mean_gain']:+.4f} (start - end)")
    return "\n".join(lines) + "\n"


def plot_forgetting(metrics: list, rep: dict, path: Path) -> Path:
    """Each domain's validation loss against tokens: old domains solid, new ones dashed."""
    from trainer.report import _save, plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, d in rep["domains"].items():
        xs, ys = zip(*_curve(metrics, name))
        ax.plot(xs, ys, marker="o", ms=3, ls="-" if d["role"] == "old" else "--", label=f"{name} ({d['role']})")
    ax.legend()
    return _save(fig, ax, path, "validation loss", "per-domain validation loss (old: solid, new: dashed)")


def write_forgetting(run_dir, old: list[str], new: list[str]) -> dict:
    """RUN/forgetting.json, forgetting.md and forgetting.png from RUN/metrics.jsonl."""
    from trainer.report import read_metrics

    run_dir = Path(run_dir)
    if not old and not new:
        raise UserError(f"{run_dir}: no old or new domains to report on; set continual.old_domains / new_domains "
                        "(or --old/--new), or add data.replay / data.val_domains")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    rep = forgetting(metrics, old, new)
    (run_dir / "forgetting.json").write_text(json.dumps(rep, indent=1))
    (run_dir / "forgetting.md").write_text(format_forgetting(rep, str(run_dir)))
    plot_forgetting(metrics, rep, run_dir / "forgetting.png")
    return rep


def at_end_of_run(cfg, run_dir: Path, say) -> None:
    """The loop's hook after the last step: the report when `continual.report` asks for it."""
    wanted = cfg.continual.report == "on" or (cfg.continual.report == "auto" and cfg.model.init_from)
    if not wanted:
        return
    old, new = split_domains(cfg)
    if not old and not new:
        say("continual: no old/new domains to report on (set continual.old_domains or data.replay); no forgetting report")
        return
    rep = write_forgetting(run_dir, old, new)
    say("\n" + format_forgetting(rep, str(run_dir)) + f"wrote {run_dir / 'forgetting.md'}, .json and .png")


def cli_forgetting(args) -> int:
    """`cptrain forgetting RUN_DIR [--old A,B] [--new C]`: the report for any finished run."""
    from trainer.config import load_config

    run_dir = Path(args.run_dir)
    cfg = load_config(run_dir / "config.yaml")
    old, new = split_domains(cfg)
    old = args.old.split(",") if args.old else old
    new = args.new.split(",") if args.new else new
    rep = write_forgetting(run_dir, old, new)
    print(format_forgetting(rep, str(run_dir)), end="")
    print(f"wrote {run_dir / 'forgetting.md'}, .json and .png")
    return 0


# ---------------------------------------------------------------- anneal branches

def _pick_checkpoint(run_dir: Path, name: str | None) -> Path:
    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"{run_dir}: no checkpoints/ folder; pass the run directory of a `cptrain train` run")
    if not name:
        return ckpt.resolve_checkpoint(run_dir)
    folder = run_dir / "checkpoints" / name
    reason = ckpt.verify(folder) if folder.is_dir() else "not found"
    if reason:
        names = [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")]
        raise UserError(f"{folder}: {reason}; --checkpoint must name one of {names or 'none yet'}")
    return folder


def branch_schedule(saved: dict, at_tokens: int, anneal_tokens: int, shape: str):
    """The branch's ScheduleConfig from the parent checkpoint's saved schedule state. A checkpoint at
    the very end of an open-ended constant phase (an infinite run that stopped there) is branched on
    a layout stretched to the branch's end, if that leaves everything up to the branch point as it was."""
    from trainer.config import from_dict
    from trainer.schedule import ScheduleConfig

    parent = from_dict(ScheduleConfig, saved["config"], "schedule", "checkpoint schedule state")
    total, per_step = saved["total_tokens"], saved["tokens_per_step"]
    if at_tokens >= total:
        old, new = build_schedule(parent, total, per_step), build_schedule(parent, at_tokens + anneal_tokens, per_step)
        same = [(s.shape, s.t0, s.lr0) for s in old.segments] == [(s.shape, s.t0, s.lr0) for s in new.segments[:len(old.segments)]]
        if not (same and old.segments[-1].shape in ("constant", "power")):
            raise UserError(f"the checkpoint is at the end of its run ({at_tokens:,} tokens) and its schedule does not end "
                            "in an open-ended constant phase with lengths in tokens; pick an earlier checkpoint (--checkpoint)")
        total = at_tokens + anneal_tokens
    return anneal_branch(parent, at_tokens, anneal_tokens, shape, total_tokens=total, tokens_per_step=per_step)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no extra space, and the parent's file is never written
    except OSError:
        shutil.copy2(src, dst)  # another filesystem


def _logged_by(line: str, step: int) -> bool:
    """A complete metrics row of a step up to `step` (the main run may be appending a row right now)."""
    try:
        return json.loads(line).get("step", 0) <= step
    except json.JSONDecodeError:
        return False


def _seed_branch(parent_ckpt: Path, parent_run: Path, out: Path, step: int, info: dict) -> None:
    """BRANCH/checkpoints/<name> linked to the parent's files, `latest`, the parent's metrics up to the
    branch point (so the branch's curves are whole) and branch.json."""
    dest = out / "checkpoints" / parent_ckpt.name
    shutil.copytree(parent_ckpt, dest, copy_function=_link_or_copy)
    (out / "checkpoints" / "latest").write_text(parent_ckpt.name + "\n")
    metrics = parent_run / "metrics.jsonl"
    if metrics.is_file():
        (out / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics.read_text().splitlines() if _logged_by(line, step)))
    (out / BRANCH_FILE).write_text(json.dumps(info, indent=1))


def prepare_branch(run_dir, out, anneal_tokens: int, shape: str = "linear", checkpoint: str | None = None,
                   overrides: list[str] | None = None):
    """Write the branch run directory `out` (config.yaml, linked checkpoint, branch.json) and return
    its TrainConfig; train it with `trainer.loop.run(cfg, resume=True)`. Re-running with the same
    arguments continues an interrupted branch from its own latest checkpoint."""
    from trainer.config import load_config, save_config

    run_dir, out = Path(run_dir), Path(out)
    if shape not in DECAY_SHAPES:
        raise UserError(f"--shape {shape!r} is unknown; use one of {', '.join(DECAY_SHAPES)}")
    if out.resolve() == run_dir.resolve():
        raise UserError(f"--out {out} is the parent run; the branch needs its own directory")
    parent_ckpt = _pick_checkpoint(run_dir, checkpoint)
    progress = ckpt.read_state(parent_ckpt)["progress"]
    at, saved = progress["tokens"], progress["schedule"]
    if not saved:
        raise UserError(f"{parent_ckpt}: the checkpoint has no schedule state; branch from a checkpoint written by `cptrain train`")
    if anneal_tokens <= 0 or anneal_tokens % saved["tokens_per_step"]:
        raise UserError(f"--tokens {anneal_tokens:,} must be a positive multiple of the parent's train.global_batch_tokens "
                        f"({saved['tokens_per_step']:,})")
    cfg = load_config(parent_ckpt / "config.yaml", [*(overrides or []), f"--run_dir={out}", "--model.init_from=",
                                                     f"--train.max_tokens={at + anneal_tokens}"])
    if cfg.train.global_batch_tokens != saved["tokens_per_step"]:
        raise UserError("train.global_batch_tokens must stay the parent's in an anneal branch (the data position and the "
                        "schedule are counted in the parent's steps); drop that override")
    cfg.schedule = branch_schedule(saved, at, anneal_tokens, shape)
    info = {"parent_run": str(run_dir.resolve()), "parent_checkpoint": parent_ckpt.name, "at_step": progress["step"],
            "at_tokens": at, "parent_lr": progress["last_lr"], "anneal_tokens": anneal_tokens, "shape": shape}
    if (out / BRANCH_FILE).is_file():
        before = json.loads((out / BRANCH_FILE).read_text())
        if before != info:
            raise UserError(f"{out} already holds another branch ({before['parent_checkpoint']}, {before['anneal_tokens']:,} "
                            f"tokens, {before['shape']}); pick a new --out")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not an anneal branch; pick a new --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _seed_branch(parent_ckpt, run_dir, out, progress["step"], info)
    save_config(cfg, out / "config.yaml")
    return cfg


def cli_anneal(args) -> int:
    """`cptrain anneal RUN_DIR --tokens N [--checkpoint step-X] [--shape S] --out BRANCH [overrides]`."""
    from trainer.config import _parse_int
    from trainer.loop import run

    tokens = _parse_int(args.tokens, "--tokens", "cptrain anneal")
    cfg = prepare_branch(args.run_dir, args.out, tokens, args.shape, args.checkpoint, args.overrides)
    info = json.loads((Path(args.out) / BRANCH_FILE).read_text())
    print(f"anneal branch of {info['parent_run']} at {info['parent_checkpoint']} ({info['at_tokens']:,} tokens, "
          f"lr {info['parent_lr']:.4g}): {args.shape} to {cfg.schedule.min_lr_ratio * cfg.schedule.lr:.4g} over "
          f"{tokens:,} tokens in {args.out}")
    if args.no_train:
        print(f"wrote {Path(args.out) / 'config.yaml'}; train it with `cptrain train {Path(args.out) / 'config.yaml'} --resume` "
              "(or under `cptrain launch`)")
        return 0
    run(cfg, resume=True)
    return 0

