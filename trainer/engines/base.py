"""The interface between the training loop and the parallelism, and what its three implementations
share: parameter groups, the optimizer, the clip-and-step, host snapshots for async checkpoints.
LocalEngine (local.py), DeepSpeedEngine (deepspeed.py) and FSDPEngine (fsdp.py) implement it; the
loop and its add-ons use nothing of an engine but what `Engine` lists, and never branch on which
engine runs."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from ...model.decoder import Decoder
from ..params import Target
from .layout import Layout
from .spec import EngineSpec

LossFn = Callable[[nn.Module, dict], "tuple[torch.Tensor, dict]"]


def cpu_snapshot(tree, into=None):
    """A copy in host memory of every tensor in `tree` (dicts, lists, tuples), taken now: a background
    checkpoint writer then reads state that later steps cannot change (of a DTensor, its local shard,
    in the same layout). From a GPU the copies go to pinned memory without a sync per tensor. `into`, a
    previous snapshot of the same structure whose writer has finished, is reused: pinning gigabytes
    anew at every checkpoint would cost more than the copy."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    devices = set()

    def copy(x, old):
        if isinstance(x, DTensor):  # a shard: its local part copied, the same layout kept
            local = copy(x.to_local(), old.to_local() if isinstance(old, DTensor) else None)
            return DTensor.from_local(local, x.device_mesh, x.placements, run_check=False, shape=x.shape,
                                      stride=x.stride())
        if is_traceable_wrapper_subclass(x):  # e.g. torchao's 8-bit optimizer states: their parts, copied as they are
            names, meta = x.__tensor_flatten__()
            parts = {n: copy(getattr(x, n), getattr(old, n) if type(old) is type(x) else None) for n in names}
            return type(x).__tensor_unflatten__(parts, meta, x.shape, x.stride())
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if not (isinstance(old, torch.Tensor) and old.shape == x.shape and old.dtype == x.dtype):
                old = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.device.type == "cuda")
            if x.device.type == "cuda":
                devices.add(x.device)
            return old.copy_(x, non_blocking=x.device.type == "cuda")
        if isinstance(x, dict):
            old = old if isinstance(old, dict) else {}
            return {k: copy(v, old.get(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            old = old if isinstance(old, (list, tuple)) and len(old) == len(x) else [None] * len(x)
            return type(x)(copy(v, o) for v, o in zip(x, old))
        return x

    out = copy(tree, into)
    for device in devices:
        torch.cuda.synchronize(device)
    return out


class Engine(Protocol):
    """Everything the loop, checkpoints and add-ons use of an engine, with one meaning in every engine."""
    spec: EngineSpec  # what it was built for (trainer/engines/spec.py)
    module: Decoder  # the plain decoder: parameters by name, as this rank holds them (shards under FSDP2, ZeRO-3)
    model: nn.Module  # what forwards outside the training step call (evaluation, sample weights): `module`, or
    #                   the wrapper that gathers its parameters (DeepSpeed)
    optimizer: torch.optim.Optimizer  # its param_groups carry `lr` and `lr_scale` (trainer/freezing.py holds groups still)
    sharded: bool  # ranks hold disjoint pieces of the parameters (so selections over them need collectives)

    def forward_backward(self, batch: dict, loss_fn: LossFn, sync: bool) -> dict:
        """Forward and backward one micro-batch; `sync` is False on all but the last of a step."""

    def step(self, lr: float) -> float:
        """Clip to spec.grad_clip, apply the optimizer with this LR, zero the gradients; returns the global
        grad norm. A non-finite global norm (NaN/inf on any rank) skips the update on every rank."""

    def zero_grad(self) -> None:
        """Discard the accumulated gradients without an update (a step the loop decided to skip)."""

    def save(self, path: Path) -> list[Path]:
        """Every rank writes its part of model + optimizer state into the folder `path`; returns the
        files this rank wrote (it hashes them for the manifest)."""

    def save_async(self, path: Path) -> Callable[[], list[Path]]:
        """Snapshot the state now (later steps cannot change what is written); the returned function
        writes it (from a background thread) and returns this rank's files as save() does."""

    def load(self, path: Path, optimizer: bool) -> None:
        """Restore from a folder written by save(); optimizer=False loads the weights only."""

    def full_state_dict(self) -> dict:
        """The full, unsharded model weights (on CPU), for export; on rank 0 at least. Collective."""

    def targets(self, pattern: str) -> list[Target]:
        """Every copy the optimizer writes of each parameter whose name fully matches `pattern`, as this
        rank holds it (trainer/params.py): what masks, frozen rows and weight EMAs act on."""

    def sync_written(self, targets: list[Target]) -> None:
        """After something other than the optimizer wrote into `targets`: make every copy a forward
        reads agree (ZeRO-3 gathers its small parameters again; a no-op elsewhere)."""


def param_groups(model: nn.Module, weight_decay: float, by_role: bool = False) -> list[dict]:
    """Decay the matrices of attention and MLP (and an untied head, a mixture of experts' routers and
    experts); norms, biases and embeddings stay undecayed (their scale is meaningful, and decaying
    rarely-seen token embeddings only shrinks them). by_role: named groups (matrices, head, embeddings,
    norms, and of a mixture of experts routers, experts) that a phase can train or hold apart
    (trainer/freezing.py); else the two groups of every earlier checkpoint."""
    roles: dict[str, list] = {"matrices": [], "head": [], "embeddings": [], "norms": [], "routers": [], "experts": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter is flat; ds_shape is its shape
        role = ("embeddings" if "tok_embeddings" in name else "norms" if ndim < 2
                else "head" if name.endswith("output.weight")
                else "routers" if ".feed_forward.router." in name or ".feed_forward.shared_gate." in name
                else "experts" if ".feed_forward.experts." in name or ".feed_forward.shared." in name
                else "matrices")
        roles[role].append(p)
    decayed = {"matrices", "head", "routers", "experts"}
    if not by_role:
        return [{"params": [p for r in roles if r in decayed for p in roles[r]], "weight_decay": weight_decay},
                {"params": roles["embeddings"] + roles["norms"], "weight_decay": 0.0}]
    return [{"params": ps, "weight_decay": weight_decay if role in decayed else 0.0, "name": role}
            for role, ps in roles.items() if ps]


def full_initial_state(model: Decoder, initial_state: dict | None, layout: Layout) -> dict | None:
    """The full weights a sharded engine starts from, on rank 0 only (None elsewhere): `initial_state`,
    or init_weights() run on a CPU copy - the same call on the same RNG stream as LocalEngine's, so
    every engine starts from identical weights. Rank 0's host memory holds one fp32 copy (4 bytes a
    parameter, 32 GB for 8B); devices only ever hold their shards."""
    if not layout.is_main:
        return None
    if initial_state is not None:
        return initial_state
    with torch.device("meta"):
        cpu_model = Decoder(model.cfg)
    cpu_model.to_empty(device="cpu")
    cpu_model.init_weights()
    return cpu_model.state_dict()


def optimizer_groups(model: nn.Module, spec: EngineSpec) -> list[dict]:
    """param_groups for this run: by role when freeze phases hold roles apart or Muon takes the matrices."""
    return param_groups(model, spec.optim.weight_decay, by_role=spec.groups_by_role)


def build_optimizer(groups: list[dict], optim, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW (fused on GPU unless optim.fused says otherwise), torchao's 8-bit AdamW or Muon, for `optim`
    (the optim section)."""
    if optim.name == "muon":
        from ..muon import Muon

        for g in groups:
            g["muon"] = g.get("name") == "matrices"
        return Muon(groups, betas=(optim.beta1, optim.beta2), eps=optim.eps, momentum=optim.muon_momentum,
                    ns_steps=optim.muon_ns_steps)
    if optim.name == "adamw8bit":
        from torchao.optim import AdamW8bit

        # Stochastic rounding applies where a parameter is bf16 (torchao checks per parameter): without it
        # an update below half a bf16 ulp of the weight is lost, as late in a cosine decay.
        return AdamW8bit(groups, lr=0.0, betas=(optim.beta1, optim.beta2), eps=optim.eps, bf16_stochastic_round=True)
    fused = optim.fused == "on" or (optim.fused == "auto" and device.type == "cuda")
    return torch.optim.AdamW(groups, lr=0.0, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused or None)


def wrap_blocks(model: Decoder, spec: EngineSpec, compile_blocks: bool | None = None, regions: bool = False) -> None:
    """Per-block activation checkpointing (its input offloaded to the host, the MLP tiled along the
    sequence: trainer/engines/memory.py) and torch.compile, applied in place before sharding, after a
    mixture of experts' dispatch and kernel are set (trainer/engines/experts.py). Both wrap the block's
    forward in place, so parameter names (and checkpoints) stay those of the plain model.
    regions: compile each block's parameter-free regions (norm, RoPE + attention, the MLP gate)
    instead of the block, for an engine whose hooks on every module (ZeRO-3's gathers) a compiled
    block would trace into and recompile on. compile_blocks: spec.compile unless the engine compiles
    otherwise (DeepCompile)."""
    from ...model.decoder import RMSNorm, gated, rms_norm, rope_attend
    from .experts import configure_experts
    from .memory import offload_checkpoints, tile_mlp

    configure_experts(model, spec)
    compile_blocks = spec.compile if compile_blocks is None else compile_blocks
    for block in model.layers:
        if spec.mlp_tile_tokens:
            tile_mlp(block, spec.mlp_tile_tokens)
    if spec.offload_activations:  # checkpoints and compile of its own (one process: trainer/engines/spec.py)
        offload_checkpoints(model, spec.layout.device, compile_blocks)
        return
    kernels = {}
    for block in model.layers:
        if spec.activation_checkpointing:
            checkpoint_in_forward(block)
        if compile_blocks and not regions:
            block.compile()
        elif compile_blocks:
            if not kernels:  # one compiled function per region, shared by every block: no per-module recompiles
                kernels = {"norm": torch.compile(rms_norm), "core": torch.compile(rope_attend), "gate": torch.compile(gated)}
            block.attention.core = kernels["core"]
            for m in block.modules():  # the norms, and the gate of the MLP (or of each expert and a shared one)
                if isinstance(m, RMSNorm):
                    m.kernel = kernels["norm"]
                elif getattr(m, "gate", None) is gated:
                    m.gate = kernels["gate"]


def checkpoint_in_forward(block) -> None:
    """Activation checkpointing as part of the block's own forward (torch.utils.checkpoint), so that,
    compiled, the recompute is traced into the block's backward graph, where the compiler fuses the
    recomputed elementwise work into the backward's kernels. (Checkpointing by module hooks reran the
    compiled forward as it is: 8B, bf16 parameters, one H100, 8,498 against 9,018 tokens/s.)"""
    from torch.utils.checkpoint import checkpoint

    plain = block.forward

    def forward(*args, **kwargs):
        return checkpoint(plain, *args, use_reentrant=False, **kwargs)
    block.forward = forward


def _by_mesh(params: list) -> list[list]:
    """Parameters grouped by the device mesh of their gradients (one group without DTensors; under expert
    parallelism the experts' (dp_out, ep) mesh beside the rest's): a norm or a clip reduces within one."""
    groups: dict = {}
    for p in params:
        groups.setdefault(id(getattr(p.grad, "device_mesh", None)), []).append(p)
    return list(groups.values())


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each group's LR, scaled by its lr_scale (0 holds a group still: trainer/freezing.py). torchao's
    optimizers keep the LR as a tensor that their compiled step reads, so it is filled in place."""
    for g in optimizer.param_groups:
        value = lr * g.get("lr_scale", 1.0)
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(value)
        else:
            g["lr"] = value


def clip_and_step(optimizer: torch.optim.Optimizer, lr: float, grad_clip: float) -> float:
    """Clip to the global grad norm, set the LR and step, unless the norm is not finite. Gradients are
    reduced over ranks by now, so every rank sees the same norm: all skip or all update. The
    gradients are zeroed either way; returns the norm."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    groups = _by_mesh(params)
    totals = [torch.nn.utils.get_total_norm([p.grad for p in group]) for group in groups]
    total = totals[0]
    # FSDP2: a DTensor of the global norm, made whole; several meshes: their norms combined
    norms = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in totals]
    norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    set_lr(optimizer, lr)
    if optimizer.defaults.get("fused") and norm is total:
        # The fused AdamW kernel divides the gradients by `grad_scale` and skips the whole update when
        # `found_inf` is set (the hooks torch's GradScaler uses): clipping and the non-finite skip then
        # cost no pass over the gradients of their own and no host sync before the update.
        # float32 whatever the parameters' dtype: the kernel takes no other (the norm of bf16 grads is bf16)
        optimizer.grad_scale = (norm.float() / grad_clip).clamp(min=1.0) if grad_clip > 0 else None
        optimizer.found_inf = (~torch.isfinite(norm)).float()
        optimizer.step()
        del optimizer.grad_scale, optimizer.found_inf
    else:
        if grad_clip > 0 and len(groups) == 1:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, total)
        elif grad_clip > 0:  # each mesh's gradients scaled by the global norm (a plain tensor: replicated on every mesh)
            from torch.distributed.tensor.experimental import implicit_replication

            with implicit_replication():
                for group in groups:
                    torch.nn.utils.clip_grads_with_norm_(group, grad_clip, norm)
        if torch.isfinite(norm):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def whole_targets(module: nn.Module, pattern: str) -> list[Target]:
    """Targets of an engine whose every rank holds whole parameters that the optimizer updates in place."""
    import re

    return [Target(n, tuple(p.shape), 0, p.data.view(-1), [(0, p.numel(), p.data.view(-1))])
            for n, p in module.named_parameters() if re.fullmatch(pattern, n)]
