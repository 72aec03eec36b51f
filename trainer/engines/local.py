"""The local engine: one process, or plain data parallelism (DDP) over a launched process group."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ...model.decoder import Decoder
from ...model.hf import load_weights, save_weights
from ..params import Target
from .base import LossFn, build_optimizer, clip_and_step, cpu_snapshot, optimizer_groups, whole_targets, wrap_blocks
from .fp8 import apply_fp8
from .spec import EngineSpec, autocast_for

OPTIMIZER_FILE = "optimizer.pt"


class _LossForward(nn.Module):
    """What DDP wraps: a forward that runs the loss function on the model. DDP synchronizes the
    gradients of whatever its forward computed, so the fused loss, which calls model.hidden() and
    reads the head weight itself, is covered like the plain one."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, loss_fn: LossFn):
        return loss_fn(self.model, batch)


def build_whole(model: Decoder, spec: EngineSpec, initial_state: dict | None) -> torch.optim.Optimizer:
    """The model whole on this device (initialized, or loaded from `initial_state`), its FP8 linears
    swapped in and its blocks wrapped, and its optimizer: LocalEngine's build, and FSDP2's on one rank."""
    device = spec.layout.device
    model.to_empty(device=device)
    model.init_weights()
    if initial_state is not None:
        model.load_state_dict(initial_state, strict=True)
    if spec.bf16_params:  # before the optimizer, whose state then follows in bf16
        model.to(torch.bfloat16)
    apply_fp8(model, spec.fp8, device)  # before compile, which then fuses the casts
    wrap_blocks(model, spec)
    return build_optimizer(optimizer_groups(model, spec), spec.optim, device)


class LocalEngine:
    """One process, or plain data parallelism (DDP) over a launched process group."""
    sharded = False

    def __init__(self, model: Decoder, spec: EngineSpec, initial_state: dict | None):
        self.spec, self.layout = spec, spec.layout
        self.optimizer = build_whole(model, spec, initial_state)
        self.model = self.module = model  # evaluation and checkpoints use the plain model
        self.ddp = nn.parallel.DistributedDataParallel(_LossForward(model)) if self.layout.world_size > 1 else None
        self._snapshot = None  # host buffers of the last async checkpoint, reused by the next

    def forward_backward(self, batch: dict, loss_fn: LossFn, sync: bool) -> dict:
        no_sync = self.ddp.no_sync if (self.ddp is not None and not sync) else contextlib.nullcontext
        with no_sync():
            with autocast_for(self.layout.device, self.spec.bf16):
                loss, stats = self.ddp(batch, loss_fn) if self.ddp is not None else loss_fn(self.model, batch)
            loss.backward()
        return stats

    def step(self, lr: float) -> float:
        return clip_and_step(self.optimizer, lr, self.spec.grad_clip)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _write(self, path: Path, weights: dict, optimizer: dict) -> list[Path]:
        save_weights(path, self.module.cfg, weights)
        torch.save(optimizer, path / OPTIMIZER_FILE)
        return [path / "model.safetensors", path / "model_config.json", path / OPTIMIZER_FILE]

    def save(self, path: Path) -> list[Path]:
        """Rank 0 writes the whole model and optimizer (every rank holds the same)."""
        return self._write(path, self.full_state_dict(), self.optimizer.state_dict()) if self.layout.is_main else []

    def save_async(self, path: Path):
        """Snapshot weights and optimizer state into host memory now; the returned function writes them."""
        if not self.layout.is_main:
            return lambda: []
        self._snapshot = cpu_snapshot((self.module.state_dict(), self.optimizer.state_dict()), into=self._snapshot)
        weights, optimizer = self._snapshot
        return lambda: self._write(path, weights, optimizer)

    def load(self, path: Path, optimizer: bool) -> None:
        _, state = load_weights(path)
        self.module.load_state_dict(state, strict=True)
        if optimizer:
            opt_file = path / OPTIMIZER_FILE
            self.optimizer.load_state_dict(torch.load(opt_file, map_location=self.layout.device, weights_only=True))

    def full_state_dict(self) -> dict:
        return {k: v.detach().to("cpu") for k, v in self.module.state_dict().items()}

    def targets(self, pattern: str) -> list[Target]:
        return whole_targets(self.module, pattern)

    def sync_written(self, targets: list[Target]) -> None:
        pass
