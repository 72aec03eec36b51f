"""Meta-experience replay (MER) on top of replay: Abbes et al. 2025, "Revisiting Replay and Gradient
Alignment for Continual Pre-Training of Large Language Models" (arXiv:2508.01908), after Riemer et
al. 2019. A Reptile-style interpolation every k optimizer steps:

    theta <- theta_anchor + strength * (theta - theta_anchor),   then theta_anchor <- theta,

which aligns the gradients of the replayed and the new data seen within the k steps (Reptile's
first-order meta-gradient) for one pass over the weights every k steps. This is the rule of the
authors' code (chandar-lab/continual-pretraining @ f6490d4, megatron/training_replay.py:
`weights_before + (weights_after - weights_before) * reptile_beta` every `reptile_inner_steps`
iterations, `weights_before` then reset; their defaults are k = 500, beta = 0.01; the paper's values
per run were not found). Two differences, both deliberate: their code interpolates
`model.state_dict()` only, so under mixed precision the optimizer's fp32 master weights keep the
uninterpolated values and the next step undoes the move; here every copy the optimizer writes is
moved (trainer/params.py Targets). And their check `iteration % k == 0` also fires at the first
iteration; here the first interpolation comes k steps after the anchor (the run's start).

The anchor is an fp32 copy of each Target's range on this rank, taken from its most precise copy
(the fp32 master where the rank holds one): 4 bytes a parameter of the rank's range, the full model
under ZeRO-1/2, whose model weights are replicated. It is saved with a checkpoint as per-rank pieces
that read back at any world size (trainer/params.py read_pieces): each rank writes the range of its
most precise copy (ZeRO-1/2: its master partition; local/DDP: rank 0 the whole model; FSDP2 and
ZeRO-3: its shard). Under ZeRO-1/2 a rank moves the bf16 replica of ranges whose master another rank
holds from its own (bf16) values: until the next step's all-gather rewrites the replicas from the
masters they may differ from them by a bf16 rounding.

In a run it is the add-on `MetaReplayAddOn` (trainer/addons.py): after each step, after freezing and
sparsity have written the weights and before the weight EMA reads them; ZeRO-3 regathers its
persistent parameters after a move (`engine.sync_written`); the anchor rides with checkpoints and is
read back on resume and rollback (a new run from a checkpoint starts its own).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .addons import AddOn, Step
from .continual import MERSection
from .params import Target, read_pieces

ANCHOR_FILE = "mer-rank{rank}.safetensors"


def _precise(t: Target) -> tuple[int, int, torch.Tensor]:
    """(lo, hi, copy) of t's most precise copy on this rank: an fp32 one if any, else its values."""
    return next(((lo, hi, v) for lo, hi, v in t.copies if v.dtype == torch.float32),
                (0, t.values.numel(), t.values))


def current(t: Target) -> torch.Tensor:
    """t's range in fp32, from its most precise copy where this rank holds one."""
    out = t.values.detach().float().clone()
    lo, hi, v = _precise(t)
    out[lo:hi] = v.detach()
    return out


class MetaReplay:
    """The Reptile interpolation of meta-experience replay over the Targets `targets()` returns
    (called at each use: an engine may rebuild its buffers on load). `sharded`: ranks hold disjoint
    ranges (FSDP2, ZeRO-3)."""

    def __init__(self, cfg: MERSection, targets: Callable[[], list[Target]], sharded: bool, step: int = 0):
        self.cfg, self.targets, self.sharded = cfg, targets, sharded
        self.anchor = {t.name: current(t) for t in targets()}  # the weights the run starts from
        self.anchor_step = step

    @torch.no_grad()
    def after_update(self, step: int) -> bool:
        """After optimizer step `step` (1-based): interpolate and reset the anchor once `interval`
        steps have passed since it was taken. Returns True when the weights were written."""
        if step - self.anchor_step < self.cfg.interval:
            return False
        for t in self.targets():
            moved = torch.lerp(self.anchor[t.name], current(t), self.cfg.strength)
            for lo, hi, view in t.copies:
                view.copy_(moved[lo:hi])
            self.anchor[t.name] = moved
        self.anchor_step = step
        return True

    def _saved_range(self, t: Target, rank: int, replicated_full: bool) -> tuple[int, int] | None:
        lo, hi, v = _precise(t)
        if not (self.sharded or replicated_full):  # ZeRO-1/2: each rank the master partitions it holds
            return (lo, hi) if v.dtype == torch.float32 else None
        return (0, t.values.numel()) if self.sharded or rank == 0 else None

    def save(self, folder: Path, rank: int) -> list[Path]:
        """This rank's pieces of the anchor (see the module docstring for which) and its step."""
        targets = self.targets()
        # replicated full copies (local, DDP): rank 0 writes all; ZeRO-1/2 (fp32 partitions): each its own
        replicated_full = not self.sharded and all(_precise(t)[1] - _precise(t)[0] == t.values.numel() for t in targets)
        pieces, starts = {}, {}
        for t in targets:
            span = self._saved_range(t, rank, replicated_full)
            if span:
                pieces[t.name] = self.anchor[t.name][span[0]:span[1]].contiguous().cpu()
                starts[t.name] = str(t.start + span[0])
        if not pieces:
            return []
        path = folder / ANCHOR_FILE.format(rank=rank)
        meta = {"mer": json.dumps({"anchor_step": self.anchor_step, "interval": self.cfg.interval,
                                   "strength": self.cfg.strength})}
        save_file(pieces, str(path), metadata=starts | meta)
        return [path]

    def load(self, folder: Path) -> bool:
        """The anchor and its step from a checkpoint written at any world size; False if it has none."""
        files = sorted(Path(folder).glob(ANCHOR_FILE.format(rank="*")))
        if not files:
            return False
        self.anchor = read_pieces(files, self.targets(), dtype=torch.float32)
        with safe_open(str(files[0]), framework="pt") as f:
            self.anchor_step = json.loads(f.metadata()["mer"])["anchor_step"]
        return True


class MetaReplayAddOn(AddOn):
    """MetaReplay over every parameter of the engine, as the loop's add-on."""

    def __init__(self, cfg: MERSection, engine, step: int):
        self.engine = engine
        self.mer = MetaReplay(cfg, lambda: engine.targets(".*"), engine.sharded, step)

    def after_update(self, step: Step) -> dict:
        if not self.mer.after_update(step.number):
            return {}
        self.engine.sync_written(self.mer.targets())
        return {"mer/interpolated": 1}

    def save(self, folder: Path, rank: int) -> list[Path]:
        return self.mer.save(folder, rank)

    def load(self, folder: Path, how: str) -> None:
        if how != "init":
            self.mer.load(folder)
