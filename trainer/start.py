"""How a run starts, decided once before anything is built: fresh, resumed from one of its own
checkpoints, or initialized from another model (continual pretraining). The decision is one small
dataclass, printed in one line; the trainer only carries it out. A run directory holds one run: a
new run never writes into a directory that holds another.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import UserError
from . import checkpoint as ckpt
from . import collectives as cc

# Model fields that may differ between a checkpoint and the run that loads it.
RUNTIME_FIELDS = {"attention", "doc_masking", "max_seq_len", "init_std"}


@dataclass(frozen=True)
class StartPlan:
    kind: Literal["fresh", "resume", "init"]
    source: str = ""  # the checkpoint resumed, or the folder initialized from (HF, weights or checkpoint)
    initial_weights: bool = False  # the engine is built with the full weights of `source`
    engine_state: bool = False  # engine.load(source): its weights in the engine's own format
    optimizer: bool = False  # with engine_state: the optimizer state too
    data_position: bool = False  # the loader continues where `source` stopped
    counters: bool = False  # step, tokens, schedule, faults, reweighting and RNG continue (a resume)
    masks: bool = False  # sparsity masks of `source` are read (kept or dropped by sparsity.enabled)
    last_lr: float | None = None  # the LR of `source`'s last step: where a rewarm starts
    step: int = 0  # resume: the checkpoint's step and tokens
    tokens: int = 0
    skipped: tuple[str, ...] = ()  # checkpoints passed over, each with its reason

    def describe(self) -> str:
        if self.kind == "fresh":
            return "starting fresh: randomly initialized weights"
        if self.kind == "resume":
            return (f"resumed from {self.source} at step {self.step} ({self.tokens:,} tokens): weights, optimizer, "
                    "data position, schedule, RNG")
        parts = ["weights"] + ["optimizer"] * self.optimizer + ["data position"] * self.data_position
        lr = f"; a rewarm starts from its lr {self.last_lr:.4g}" if self.last_lr else ""
        return f"continuing from {self.source}: {' + '.join(parts)}{lr}"


def _check_shape(folder: Path, arch) -> None:
    saved, now = dataclasses.asdict(ckpt.model_config_of(folder)), dataclasses.asdict(arch)
    diff = [k for k in saved if k not in RUNTIME_FIELDS and saved[k] != now.get(k)]
    if diff:
        raise UserError(f"{folder}: checkpoint model differs from the config in {', '.join(diff)}; "
                        f"resume with the run's own config ({folder / 'config.yaml'}) or use a new run_dir")


def _init_plan(cfg) -> StartPlan:
    m = cfg.model
    folder = ckpt.resolve_checkpoint(m.init_from)
    if not (folder / ckpt.STATE).is_file():  # an HF or weights-only folder
        if m.load != "weights":
            raise UserError(f"{m.init_from}: holds weights only, so model.load={m.load} cannot be restored; "
                            "set model.load=weights or start from a cptrain checkpoint")
        return StartPlan("init", str(folder), initial_weights=True)
    last_lr = ckpt.read_state(folder)["progress"].get("last_lr") or None
    if m.load == "weights":
        return StartPlan("init", str(folder), initial_weights=True, masks=True, last_lr=last_lr)
    return StartPlan("init", str(folder), engine_state=True, optimizer=not m.reset_optimizer,
                     data_position=m.load == "all", masks=True, last_lr=last_lr)


def holds_run(run_dir: Path) -> list[str]:
    """What in `run_dir` belongs to a run (empty: nothing; launch scripts and hostfiles do not count)."""
    found = [name for name in ("config.yaml", "metrics.jsonl") if (run_dir / name).is_file()]
    n = len(ckpt.list_checkpoints(run_dir / "checkpoints"))
    return found + ([f"{n} checkpoint{'s' * (n != 1)}"] if n else [])


def _claim_run_dir(run_dir: Path, resume: bool, overwrite: bool, say) -> None:
    """A new run never writes into another run's directory: refuse, or with --overwrite move the old
    run aside (renamed, never deleted)."""
    held = holds_run(run_dir)
    if resume or not held:
        return
    if not overwrite:
        raise UserError(f"{run_dir} holds a run ({', '.join(held)}); continue it with --resume, or start anew in "
                        "another directory with --run_dir=NEW (or move it aside with --overwrite)")
    base = f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = run_dir.with_name(base), 0
    while aside.exists():  # two --overwrite starts within a second
        n += 1
        aside = run_dir.with_name(f"{base}-{n}")
    run_dir.rename(aside)
    say(f"--overwrite: moved the run that was in {run_dir} to {aside}")


def plan_start(cfg, resume: bool, overwrite: bool = False, say=print) -> StartPlan:
    """The plan for `cfg`: with `resume`, the checkpoint find_resume picks (none: as without
    `resume`); else `model.init_from` if set; else fresh. Collective: every rank calls it and gets
    the same plan (rank 0 reads the directories, every rank verifies a share of the checkpoint)."""
    run_dir = Path(cfg.run_dir)
    cc.on_rank0(lambda: _claim_run_dir(run_dir, resume, overwrite, say))
    skipped: list[str] = []
    if resume:
        folder = ckpt.find_resume(run_dir, log=skipped.append)
        if folder is not None:
            return cc.on_rank0(lambda: _resume_plan(folder, cfg.model.arch, tuple(skipped)))
        say(f"no complete checkpoint in {run_dir}; starting from the beginning")
    plan = cc.on_rank0(lambda: _init_plan(cfg) if cfg.model.init_from else StartPlan("fresh"))
    return dataclasses.replace(plan, skipped=tuple(skipped))


def _resume_plan(folder: Path, arch, skipped: tuple) -> StartPlan:
    _check_shape(folder, arch)
    progress = ckpt.read_state(folder)["progress"]
    return StartPlan("resume", str(folder), engine_state=True, optimizer=True, data_position=True, counters=True,
                     masks=True, step=progress["step"], tokens=progress["tokens"], skipped=skipped)
