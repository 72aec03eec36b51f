"""The local engine: one process, or plain data parallelism (DDP) over a launched process group."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ...model.hf import load_weights, save_weights
from ...model.decoder import Decoder
from .base import (DistContext, LossFn, autocast_for, build_optimizer, clip_and_step, cpu_snapshot, optimizer_groups,
                   wrap_blocks)
from .fp8 import apply_fp8

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


def build_whole(model: Decoder, cfg, ctx: DistContext, initial_state: dict | None) -> torch.optim.Optimizer:
    """The model whole on this device (initialized, or loaded from `initial_state`), its FP8 linears
    swapped in and its blocks wrapped, and its optimizer: LocalEngine's build, and FSDP2's on one rank."""
    model.to_empty(device=ctx.device)
    model.init_weights()
    if initial_state is not None:
        model.load_state_dict(initial_state, strict=True)
    apply_fp8(model, cfg.train, ctx.device)  # before compile, which then fuses the casts
    wrap_blocks(model, cfg.train.activation_checkpointing, cfg.train.compile)
    return build_optimizer(optimizer_groups(model, cfg), cfg.optim, ctx.device)


class LocalEngine:
    """One process, or plain data parallelism (DDP) over a launched process group."""

    def __init__(self, model: Decoder, cfg, ctx: DistContext, initial_state: dict | None):
        self.ctx, self.cfg = ctx, cfg
        self.optimizer = build_whole(model, cfg, ctx, initial_state)
        self.model = self.inner = model  # evaluation and checkpoints use the plain model
        self.ddp = nn.parallel.DistributedDataParallel(_LossForward(model)) if ctx.world_size > 1 else None
        self.autocast = lambda: autocast_for(ctx.device, cfg.train.precision)
        self._snapshot = None  # host buffers of the last async checkpoint, reused by the next

    def forward_backward(self, batch: dict, loss_fn: LossFn, sync: bool) -> dict:
        no_sync = self.ddp.no_sync if (self.ddp is not None and not sync) else contextlib.nullcontext
        with no_sync():
            with self.autocast():
                loss, stats = self.ddp(batch, loss_fn) if self.ddp is not None else loss_fn(self.model, batch)
            loss.backward()
        return stats

    def step(self, lr: float, grad_clip: float) -> float:
        return clip_and_step(self.optimizer, lr, grad_clip)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _write(self, path: Path, weights: dict, optimizer: dict) -> list[Path]:
        save_weights(path, self.inner.cfg, weights)
        torch.save(optimizer, path / OPTIMIZER_FILE)
        return [path / "model.safetensors", path / "model_config.json", path / OPTIMIZER_FILE]

    def save(self, path: Path) -> list[Path]:
        """Rank 0 writes the whole model and optimizer (every rank holds the same)."""
        return self._write(path, self.full_state_dict(), self.optimizer.state_dict()) if self.ctx.is_main else []

    def save_async(self, path: Path):
        """Snapshot weights and optimizer state into host memory now; the returned function writes them."""
        if not self.ctx.is_main:
            return lambda: []
        self._snapshot = cpu_snapshot((self.inner.state_dict(), self.optimizer.state_dict()), into=self._snapshot)
        weights, optimizer = self._snapshot
        return lambda: self._write(path, weights, optimizer)

    def load(self, path: Path, optimizer: bool) -> None:
        _, state = load_weights(path)
        self.inner.load_state_dict(state, strict=True)
        if optimizer:
            opt_file = path / OPTIMIZER_FILE
            self.optimizer.load_state_dict(torch.load(opt_file, map_location=self.ctx.device, weights_only=True))

    def full_state_dict(self) -> dict:
        return {k: v.detach().to("cpu") for k, v in self.inner.state_dict().items()}
