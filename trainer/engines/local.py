"""The local engine: one process, or plain data parallelism (DDP) over a launched process group."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ...errors import UserError
from ...model.hf import load_weights, save_weights
from ...model.llama import Llama
from .base import (DistContext, LossFn, autocast_for, build_optimizer, clip_and_step,
                   param_groups, wrap_blocks)


class LocalEngine:
    """One process, or plain data parallelism (DDP) over a launched process group."""

    def __init__(self, model: Llama, cfg, ctx: DistContext, initial_state: dict | None):
        self.ctx, self.cfg = ctx, cfg
        if ctx.world_size > 1 and cfg.train.loss_chunk_tokens > 0:
            # The fused loss calls model.hidden(), which DDP's forward hooks never see (no gradient sync).
            raise UserError("train.loss_chunk_tokens needs train.engine=fsdp2 or deepspeed when running on several "
                            "processes; set it to 0 for the local (DDP) engine")
        model.to_empty(device=ctx.device)
        model.init_weights()
        if initial_state is not None:
            model.load_state_dict(initial_state, strict=True)
        wrap_blocks(model, cfg.train.activation_checkpointing, cfg.train.compile)
        self.inner = model
        self.model = nn.parallel.DistributedDataParallel(model) if ctx.world_size > 1 else model
        self.optimizer = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim, ctx.device)
        self.autocast = lambda: autocast_for(ctx.device, cfg.train.precision)

    def forward_backward(self, batch: dict, loss_fn: LossFn, sync: bool) -> dict:
        no_sync = self.model.no_sync if (not sync and isinstance(self.model, nn.parallel.DistributedDataParallel)) else contextlib.nullcontext
        with no_sync():
            with self.autocast():
                loss, stats = loss_fn(self.model, batch)
            loss.backward()
        return stats

    def step(self, lr: float, grad_clip: float) -> float:
        return clip_and_step(self.optimizer, lr, grad_clip)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, path: Path) -> None:
        if self.ctx.is_main:
            save_weights(path, self.inner.cfg, self.full_state_dict())
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")

    def load(self, path: Path, optimizer: bool) -> None:
        _, state = load_weights(path)
        self.inner.load_state_dict(state, strict=True)
        if optimizer:
            opt_file = path / "optimizer.pt"
            self.optimizer.load_state_dict(torch.load(opt_file, map_location=self.ctx.device, weights_only=True))

    def full_state_dict(self) -> dict:
        return {k: v.detach().to("cpu") for k, v in self.inner.state_dict().items()}
