"""Activation memory for long sequences on one GPU, beyond per-block activation checkpointing and the
chunked loss (Arctic Long Sequence Training, Bekman et al. 2025, does the same three things):

- Offloaded checkpoints (`train.offload_activations`): the input each checkpointed block keeps for its
  recompute (2 x dim bytes a token a layer in bf16; 8 GB for an 8B model at 128K tokens) goes to pinned
  host memory on a side stream while the next blocks compute, and comes back one block ahead of the
  backward that needs it, so the copies hide behind compute. GPU memory then holds one block's
  activations and whatever is in flight.
- A tiled MLP (`train.mlp_tile_tokens`): the gated MLP runs over tiles of the sequence, each its own
  checkpoint, so its three ffn_dim-wide intermediates (6 x ffn_dim bytes a token in bf16, 11 GB at 8B
  and 128K tokens) exist for one tile at a time, in the block's recompute as in its forward.

Both apply in place to the blocks of a model before it is sharded or compiled; parameter names and
checkpoints are unchanged. The offload recomputes each block inside its own backward (the reentrant
form of checkpointing), which one process runs as it is; data-parallel runs shard activations with
context parallelism instead (refused at config load).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.utils.checkpoint as torch_checkpoint


def tile_mlp(block, tile_tokens: int) -> None:
    """The block's MLP over tiles of `tile_tokens` positions, each checkpointed on its own."""
    ff = block.feed_forward
    plain = ff.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] <= tile_tokens:
            return plain(x)
        return torch.cat([torch_checkpoint.checkpoint(plain, piece, use_reentrant=False)
                          for piece in x.split(tile_tokens, dim=1)], dim=1)
    ff.forward = forward


class HostStash:
    """Block inputs of the forward in flight, parked in pinned host memory (on a GPU; plain host copies
    on a CPU, which exercise the same path): `put` starts the copy out, `take` returns the tensor on the
    device and starts bringing back the block before it, whose backward comes next."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.parked: dict[int, dict] = {}  # block index -> {"host", "back" (device copy on its way), "event"}

    def put(self, index: int, x: torch.Tensor) -> None:
        if self.stream is None:
            self.parked[index] = {"host": x.detach().clone(), "back": None}
            return
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # x is computed
        with torch.cuda.stream(self.stream):
            host.copy_(x.detach(), non_blocking=True)
        x.record_stream(self.stream)  # its memory is not reused before the copy has read it
        self.parked[index] = {"host": host, "back": None}

    def _bring_back(self, index: int) -> None:
        slot = self.parked.get(index)
        if slot is None or slot["back"] is not None:
            return
        if self.stream is None:
            slot["back"] = slot["host"]
            return
        with torch.cuda.stream(self.stream):
            slot["back"] = slot["host"].to(self.device, non_blocking=True)
            slot["event"] = torch.cuda.Event()
            slot["event"].record(self.stream)

    def take(self, index: int) -> torch.Tensor:
        self._bring_back(index)
        slot = self.parked.pop(index)
        x = slot["back"]
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(slot["event"])
            x.record_stream(torch.cuda.current_stream(self.device))
        self._bring_back(index - 1)  # the next backward's input, while this block recomputes
        return x


class _OffloadedBlock(torch.autograd.Function):
    """A block run without saving anything but its input, parked on the host; its backward brings the
    input back, recomputes the block with autograd on (under the forward's autocast) and backpropagates
    through it (parameter gradients accumulate there)."""

    @staticmethod
    def forward(ctx, run, stash: HostStash, index: int, x, contexts):
        ctx.run, ctx.stash, ctx.index, ctx.contexts = run, stash, index, contexts
        ctx.autocast = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        with torch.no_grad():
            out = run(x, contexts)
        stash.put(index, x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x = ctx.stash.take(ctx.index).detach().requires_grad_()
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            out = ctx.run(x, ctx.contexts)
        torch.autograd.backward(out, grad_out)
        return None, None, None, x.grad, None


def offload_checkpoints(model, device: torch.device, compile_blocks: bool) -> None:
    """Checkpoint every block with its input parked on the host (instead of base.py's checkpoint_in_forward);
    compiled blocks are compiled inside the wrapper. A block returns (hidden, router statistics); a dense
    one's statistics are None, and config load keeps mixtures of experts off this path."""
    stash = HostStash(device)
    for index, block in enumerate(model.layers):
        run = torch.compile(block.forward) if compile_blocks else block.forward
        block.forward = partial(_no_stats, partial(_OffloadedBlock.apply, partial(_hidden, run), stash, index))


def _hidden(run, x, contexts):
    return run(x, contexts)[0]


def _no_stats(offloaded, x, contexts):
    return offloaded(x, contexts), None
