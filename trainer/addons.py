"""Add-ons: what the loop calls around a step besides the engine (fault monitoring, reweighting,
freezing, sparsity, the weight EMA, task and passkey evaluation), through one interface and held in
one ordered list that the loop walks (trainer/loop.py `build_addons` makes it).

Hooks, in the order the loop calls them (every add-on in list order at each point):
  wrap_loss(loss_fn, step) -> loss_fn   the loss of the step about to run (fault injection)
  before_step(batches, tokens) -> row   the step's micro-batches, before backward (sample weights;
                                        which parameter groups learn in this phase)
  after_update(step) -> row             after the optimizer step, or its skip: whatever writes weights
                                        (frozen rows back, masks, the EMA), before anything reads them
  evaluate() -> row                     at evaluation points, beside the validation losses
  after_step(step, row) -> row          once the step's metrics and evaluation are in (domain weights)
  at_end(run_dir)                       when the loop ends (its budget trained, or stopped by a signal)
State, one way: `save(folder, rank)` writes an add-on's part of a checkpoint and returns the files
this rank wrote; `load(folder, how)` reads it back, `how` saying why: "resume" (this run continues),
"rollback" (the loop returns to the checkpoint after a loss spike; the add-on's own counters go on)
or "init" (a new run starts from the checkpoint). By default an add-on with a `name` keeps a small
JSON `state_dict()` in `<name>.json`, written by rank 0 and restored on resume; add-ons with
per-rank tensors (masks, EMAs) write their own files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import STATE


@dataclass
class Step:
    """One finished step, as the hooks after it see it."""
    number: int  # 1-based
    before: int  # tokens trained before it
    after: int  # tokens trained after it
    updated: bool  # the optimizer applied the update (not skipped)
    domain_loss_sums: torch.Tensor  # [domains] sums of sample losses over the global batch (all ranks)
    domain_counts: torch.Tensor  # [domains] samples of each domain in the global batch
    sums: dict = field(default_factory=dict)  # what the loss reported besides, summed over the global batch (trainer/moe.py)


class AddOn:
    """No-op hooks, and the default JSON state; an add-on overrides what it uses."""
    name = ""  # its state file in a checkpoint, `<name>.json` (empty: it keeps no JSON state)

    def wrap_loss(self, loss_fn, step: int):
        return loss_fn

    def before_step(self, batches: list[dict], tokens: int) -> dict:
        return {}

    def after_update(self, step: Step) -> dict:
        return {}

    def evaluate(self) -> dict:
        return {}

    def after_step(self, step: Step, row: dict) -> dict:
        return {}

    def at_end(self, run_dir: Path) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save(self, folder: Path, rank: int) -> list[Path]:
        if not self.name or rank != 0:
            return []
        path = folder / f"{self.name}.json"
        path.write_text(json.dumps(self.state_dict(), indent=1))
        return [path]

    def load(self, folder: Path, how: str) -> None:
        if how == "resume" and self.name:
            state = saved_state(folder, self.name)
            if state is not None:
                self.load_state_dict(state)


def saved_state(folder: Path, name: str) -> dict | None:
    """An add-on's JSON state in a checkpoint: `<name>.json`, or, in checkpoints written before add-ons
    kept files of their own, the `progress` entry of the trainer state that held it (faults, reweighting)."""
    path = Path(folder) / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    legacy = Path(folder) / STATE
    if legacy.is_file():
        return json.loads(legacy.read_text()).get("progress", {}).get(name)
    return None
