"""Training in phases: after a vocabulary extension, first only the new embedding rows (or every
embedding and head row) learn while the rest of the model holds still, then everything; in a mixture
of experts, a phase may train only the routers or only the experts (an upcycled model's new router
first, say).

A phase holds parameters still two ways, both engine-agnostic:
  * whole groups (attention and MLP matrices, norms, an untied head) get lr_scale 0 in their
    optimizer group (trainer/engines/base.py `param_groups(by_role=True)`): AdamW's update and its
    decoupled weight decay are both scaled by the LR, so the weights do not move at all;
  * the old rows of the embedding (and head), which share a tensor with the new rows, are written
    back after every optimizer step, into every copy the optimizer keeps (the model's, a ZeRO fp32
    master's, a shard's; trainer/sparsity.py finds them), from a snapshot taken when the phase
    starts. Adam's moments keep tracking their gradients, so the next phase starts warm.
The phase is a function of tokens seen, so a resumed run is in the same phase; the snapshot is
taken again from the (unchanged) weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..errors import UserError
from .addons import AddOn, Step
from .params import collect_targets

EXTENSION_FILE = "vocab_extension.json"  # written by `cptrain vocab extend` into its HF folder


@dataclass
class FreezePhase:
    until_tokens: int = 0  # the phase covers the run's tokens before this count
    # what learns: the new vocabulary rows, every embedding and head row, or a mixture of experts' routers or experts
    train: Literal["new_rows", "embeddings", "routers", "experts"] = "new_rows"


@dataclass
class FreezeConfig:
    phases: list[FreezePhase] = field(default_factory=list)  # in order; after the last one everything trains
    new_rows_from: int = 0  # first new token id; 0: first_new_id of model.init_from's vocab_extension.json

    def check(self, init_from: str, vocab_size: int, src: str, n_experts: int = 0) -> None:
        ends = [p.until_tokens for p in self.phases]
        if any(e <= 0 for e in ends) or ends != sorted(set(ends)):
            raise UserError(f"{src}: freeze.phases need positive, increasing until_tokens, got {ends}")
        moe = [p.train for p in self.phases if p.train in ("routers", "experts")]
        if moe and not n_experts:
            raise UserError(f"{src}: freeze.phases train only the {moe[0]}, but the model has no mixture of experts")
        if any(p.train == "new_rows" for p in self.phases):
            first = self.first_new_row(init_from, src)
            if not 0 < first < vocab_size:
                raise UserError(f"{src}: freeze.new_rows_from={first} must lie inside the vocabulary (1..{vocab_size - 1})")

    def first_new_row(self, init_from: str, src: str) -> int:
        if self.new_rows_from:
            return self.new_rows_from
        report = Path(init_from) / EXTENSION_FILE if init_from else None
        if report is None or not report.is_file():
            raise UserError(f"{src}: freeze trains new_rows, but model.init_from has no {EXTENSION_FILE} (written by "
                            "`cptrain vocab extend`); set freeze.new_rows_from to the first new token id")
        return int(json.loads(report.read_text())["first_new_id"])


class Freezer(AddOn):
    """The loop's hooks: before_step (set the groups' lr_scale for the step's phase), after_update
    (write the old rows back)."""

    def __init__(self, cfg: FreezeConfig, init_from: str, engine, say=print):
        self.cfg, self.engine, self.say = cfg, engine, say
        self.first = cfg.first_new_row(init_from, "freeze") if any(p.train == "new_rows" for p in cfg.phases) else 0
        self.phase: FreezePhase | None = None
        self.snapshot: list | None = None  # per target: (target, old-row values of this rank's range)

    def _phase(self, tokens: int) -> FreezePhase | None:
        return next((p for p in self.cfg.phases if tokens < p.until_tokens), None)

    def before_step(self, batches: list[dict], tokens: int) -> dict:
        phase = self._phase(tokens)
        if phase is self.phase:
            return {}
        self.phase = phase
        learning = {"new_rows": {"embeddings", "head"}, "embeddings": {"embeddings", "head"}, "routers": {"routers"},
                    "experts": {"experts"}}.get(phase.train) if phase else None
        for group in self.engine.optimizer.param_groups:
            group["lr_scale"] = 1.0 if learning is None or group.get("name") in learning else 0.0
        self.snapshot = self._take_snapshot() if phase is not None and phase.train == "new_rows" else None
        what = "everything" if phase is None else {"new_rows": "the new embedding rows", "embeddings": "the embedding and head rows",
                                                   "routers": "the routers", "experts": "the experts"}[phase.train]
        self.say(f"freeze: from {tokens:,} tokens {what} learn" + (f" (until {phase.until_tokens:,})" if phase else ""))
        return {}

    def _targets(self):
        tied = self.engine.module.output is None
        return collect_targets(self.engine, ["embeddings"] if tied else ["embeddings", "output"])[0]

    def _old_rows(self):
        """(view, index) of the old-row elements of every copy of the embedding and head on this rank."""
        for t in self._targets():
            old = max(0, min(t.values.numel(), self.first * t.shape[1] - t.start))  # of this rank's range
            for lo, hi, view in t.copies:
                if min(hi, old) > lo:
                    yield view[: min(hi, old) - lo]

    def _take_snapshot(self) -> list:
        return [part.detach().clone() for part in self._old_rows()]

    @torch.no_grad()
    def after_update(self, step: Step) -> dict:
        """Write the old rows back into every copy (the optimizer has just moved them)."""
        if self.snapshot is not None and step.updated:
            for part, saved in zip(self._old_rows(), self.snapshot):
                part.copy_(saved)
            self.engine.sync_written(self._targets())  # ZeRO-3's gathered copy of small tensors
        return {}
