"""Weight averaging, the cheap alternative to an anneal branch: an EMA of the weights kept during
training (`train.ema_decay`), and merging a run's checkpoints afterwards (`cptrain merge`).

Merging (Tian et al. 2025, "WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging"; Sanyal
et al. 2023 on early weight averaging): checkpoints theta_1..theta_k of a constant-LR phase merged
as sum_i c_i theta_i (sum c_i = 1) equal the last update sequence replayed with the update between
theta_{i-1} and theta_i scaled by w_i = c_i + ... + c_k. Choosing w_i = f(u_i), f a decay shape
from 1 to 0 and u_i the middle of interval i in the window, gives c_k = w_k, c_i = w_i - w_{i+1}
and c_1 = 1 - w_2: the merge emulates that decay without training it (the linear shape gives the
trapezoid rule's weights, half at both ends; the default, uniform weights, is close to it). The
result is a weights folder that trains (`model.init_from`), evaluates, anneals (init_from with a
decay schedule) and exports like any other.

The EMA is kept in fp32 beside the copy of every parameter each rank holds (the Targets of
trainer/params.py: the master weights, or ZeRO-1/2's replicated model weights), so it costs no
communication under any engine (4 bytes a parameter, sharded like the weights under ZeRO-3 and
FSDP2), and is saved with checkpoints as per-rank pieces that read back at any world size. It
starts from the weights the run starts from (a continued run: the pretrained ones), with no bias
correction, and a resumed run continues it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserError
from . import checkpoint as ckpt
from .addons import AddOn, Step
from .params import Target, collect_targets, read_pieces

EMA_FILE = "ema-rank{rank}.safetensors"
SHAPES = {"linear": lambda u: 1 - u, "cosine": lambda u: (1 + math.cos(math.pi * u)) / 2,
          "1-sqrt": lambda u: 1 - math.sqrt(u)}


def shape_coefficients(k: int, shape: str) -> list[float]:
    """Merge coefficients c_1..c_k (oldest first) that emulate decaying along `shape` over the window."""
    if shape not in SHAPES:
        raise UserError(f"--shape {shape!r} is unknown; use one of {', '.join(SHAPES)}")
    if k < 2:
        return [1.0]
    w = [1.0] + [SHAPES[shape]((i - 1.5) / (k - 1)) for i in range(2, k + 1)] + [0.0]
    return [w[i] - w[i + 1] for i in range(k)]


def merge_coefficients(k: int, weights: list[float] | None, shape: str | None) -> list[float]:
    """c_1..c_k: given weights (they must sum to 1), a decay shape's, or uniform."""
    if weights:
        if len(weights) != k:
            raise UserError(f"--weights has {len(weights)} values for {k} checkpoints; give one per checkpoint")
        if abs(sum(weights) - 1.0) > 1e-6:
            raise UserError(f"--weights sum to {sum(weights):.6g}; a merge's weights must sum to 1")
        return list(weights)
    return shape_coefficients(k, shape) if shape else [1.0 / k] * k


def merge_checkpoints(folders: list[Path], coefficients: list[float], ema: bool = False) -> tuple:
    """(config, sum_i c_i * weights_i in fp32), reading one checkpoint at a time; ema: each
    checkpoint's EMA of the weights instead of its weights."""
    cfg, total = None, None
    for folder, c in zip(folders, coefficients):
        this_cfg, state = ema_weights(folder) if ema else ckpt.load_full_weights(folder)
        if cfg is not None and this_cfg != cfg:
            raise UserError(f"{folder}: a model of another shape than {folders[0]}; merge checkpoints of one run")
        cfg = this_cfg
        if total is None:
            total = {k: v.float() * c for k, v in state.items()}
        else:
            for k, v in state.items():
                total[k].add_(v.float(), alpha=c)
    return cfg, total


def pick_checkpoints(run_dir: Path, last: int | None, steps: list[int] | None) -> list[Path]:
    """The run's verified checkpoints to merge, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = {ckpt.step_of(c): c for c in ckpt.list_checkpoints(root)}
    if not found:
        raise UserError(f"{run_dir}: no checkpoints to merge; pass the directory of a `cptrain train` run")
    if steps:
        missing = [s for s in steps if s not in found]
        if missing:
            raise UserError(f"{run_dir}: no checkpoint of step {missing}; it has {sorted(found)}")
        chosen = [found[s] for s in sorted(steps)]
    else:
        if not last or last < 1:
            raise UserError("--last K needs K >= 1 (or give --steps A,B,...)")
        if last > len(found):
            raise UserError(f"--last {last}: {run_dir} has only {len(found)} checkpoints ({sorted(found)})")
        chosen = [found[s] for s in sorted(found)[-last:]]
    for c in chosen:
        reason = ckpt.verify(c)
        if reason:
            raise UserError(f"{c}: {reason}; leave it out of the merge")
    return chosen


class WeightEMA(AddOn):
    """theta_ema <- d theta_ema + (1 - d) theta after every optimizer step, on this rank's ranges."""

    def __init__(self, decay: float, engine, say=print):
        self.decay, self.engine, self.say = decay, engine, say
        targets, self.sharded = collect_targets(engine, ["all"])
        self.avg = {t.name: t.values.detach().float().clone() for t in targets}  # starts at the initial weights

    @torch.no_grad()
    def after_update(self, step: Step) -> dict:
        """Of the weights as the step left them (masks, held rows and all: the add-ons before it ran)."""
        targets = collect_targets(self.engine, ["all"])[0]
        torch._foreach_lerp_([self.avg[t.name] for t in targets], [t.values.detach().float() for t in targets],
                             1 - self.decay)
        return {}

    def save(self, folder: Path, rank: int) -> list[Path]:
        if not (self.sharded or rank == 0):  # replicated ranks hold the same average
            return []
        targets = collect_targets(self.engine, ["all"])[0]
        path = folder / EMA_FILE.format(rank=rank)
        save_file({k: v.contiguous().cpu() for k, v in self.avg.items()}, str(path),
                  metadata={t.name: str(t.start) for t in targets} | {"decay": str(self.decay)})
        return [path]

    def load(self, folder: Path, how: str) -> None:
        """Resumed and rolled-back runs continue the checkpoint's EMA; a new run starts its own."""
        if how == "init":
            return
        files = sorted(folder.glob(EMA_FILE.format(rank="*")))
        if files:
            self.avg = read_pieces(files, collect_targets(self.engine, ["all"])[0], dtype=torch.float32)
        elif how == "resume":
            self.say(f"train.ema_decay: {folder} holds no EMA of the weights; it starts from them now")


def ema_weights(folder: Path) -> tuple:
    """(config, the full EMA weights) of a checkpoint, assembled from its per-rank pieces."""
    files = sorted(Path(folder).glob(EMA_FILE.format(rank="*")))
    if not files:
        raise UserError(f"{folder}: holds no EMA of the weights; train with train.ema_decay > 0")
    cfg = ckpt.model_config_of(folder)
    from ..model.decoder import Decoder

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Decoder(cfg).state_dict().items()}
    whole = [Target(k, tuple(s), 0, torch.empty(s.numel()), []) for k, s in shapes.items()]  # each tensor's full range
    full = read_pieces(files, whole, dtype=torch.float32)
    return cfg, {k: v.view(shapes[k]) for k, v in full.items()}


def write_merged(out: Path, cfg, state: dict, info: dict) -> Path:
    """The merged weights as a weights folder (model.safetensors + model_config.json) with merge.json."""
    from ..model.hf import save_weights

    save_weights(out, cfg, state)
    (out / "merge.json").write_text(json.dumps(info, indent=1))
    return out
