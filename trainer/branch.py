"""Anneal branches (Hu et al. 2024, WSD; Ibrahim et al. 2024, infinite schedules): a checkpoint of a
constant (or power) phase becomes a finished model by a short decay run in its own directory. The
branch gets hard links to the parent's checkpoint files and resumes them exactly (weights,
optimizer, data position, RNG, the parent's LR), so the main run is never touched: the parent's
files are only read, and a link the branch later prunes is the branch's own.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import UserError
from . import checkpoint as ckpt
from .config import from_dict, load_config, save_config
from .schedule import DECAY_SHAPES, ScheduleConfig, anneal_branch, build_schedule

BRANCH_FILE = "branch.json"


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
    its TrainConfig; train it with `cptrain.trainer.loop.run(cfg, resume=True)`. Re-running with the same
    arguments continues an interrupted branch from its own latest checkpoint."""
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
    # The parent's resolved model as it is: nothing to initialize from, nothing to extend again.
    cfg = load_config(parent_ckpt / "config.yaml", [*(overrides or []), f"--run_dir={out}", "--model.init_from=",
                                                     "--model.extend={}", f"--train.max_tokens={at + anneal_tokens}"])
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
