"""What an engine is told: a narrow, typed spec computed once from the config and the process layout.

Every rule that turns config keys into an engine setting lives here, once: whether bf16 is on, how
many micro-batches make a step, which FP8 recipe applies, how the parameters are grouped for the
optimizer. The engines read the spec and their own section (deepspeed.*, fsdp.*), never the whole
config.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import UserError
from .layout import Layout


@dataclass(frozen=True)
class FP8Spec:
    recipe: str = "off"  # off | tensorwise | rowwise (trainer/engines/fp8.py)
    min_features: int = 1024  # linears narrower than this stay in bf16
    keep_ends: bool = True  # the first and last blocks stay in bf16
    emulate: bool = False  # emulated FP8 matmuls (CPU tests only)


@dataclass(frozen=True)
class EngineSpec:
    engine: str  # local | deepspeed | fsdp2 (train.engine)
    layout: Layout
    bf16: bool  # bf16 compute with fp32 master weights and fp32 gradient reduction
    bf16_params: bool  # the weights themselves in bf16, no fp32 master (train.param_dtype; engine local)
    accumulation: int  # micro-batches per rank per optimizer step
    micro_batch_size: int  # sequences per rank per forward
    grad_clip: float  # max global gradient norm (0: no clipping)
    compile: bool  # torch.compile per block (per region under ZeRO-3)
    activation_checkpointing: bool  # recompute each block's activations in backward
    offload_activations: bool  # the checkpointed block inputs wait in pinned host memory (trainer/engines/memory.py)
    mlp_tile_tokens: int  # >0: the MLP over tiles of this many positions, each checkpointed
    fused_loss: bool  # the loss reads the head weight outside the model's forward (train.loss_chunk_tokens > 0)
    fp8: FP8Spec
    optim: object  # trainer.config.OptimSection: the optimizer's name and hyperparameters
    groups_by_role: bool  # four named parameter groups (matrices / head / embeddings / norms) instead of two
    async_checkpoint: bool  # checkpoints written by a background thread (save_async)
    scratch_dir: Path  # where an engine may convert a checkpoint it loads (the run directory)
    deepspeed: object = None  # trainer.engines.deepspeed.DeepSpeedSection, with train.engine=deepspeed
    fsdp: object = None  # trainer.engines.fsdp.FSDPSection, with train.engine=fsdp2
    moe_capacity_factor: float = 0.0  # mixtures of experts: an expert's capacity in even shares (0: dropless; model/moe.py)
    moe_kernel: str = "auto"  # the experts' kernel: auto | grouped | loop (trainer/engines/experts.py)


def uses_bf16(precision: str, device_type: str) -> bool:
    """The one rule for bf16: asked for, or `auto` on a GPU."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def grad_accumulation(global_batch_tokens: int, seq_len: int, micro_batch_size: int, dp_size: int, src: str) -> int:
    """Micro-batches per rank per step: the global batch in sequences over (micro-batch x data-parallel ranks)."""
    per_pass = seq_len * micro_batch_size * dp_size
    if global_batch_tokens % per_pass:
        ranks = f" * {dp_size} data-parallel ranks" if dp_size > 1 else ""
        raise UserError(f"{src}: train.global_batch_tokens={global_batch_tokens} is not a multiple of data.seq_len * "
                        f"train.micro_batch_size{ranks} = {per_pass}; pick a multiple, or change train.micro_batch_size "
                        "or the number of processes")
    return global_batch_tokens // per_pass


def engine_spec(cfg, layout: Layout) -> EngineSpec:
    """The spec of `cfg` (a TrainConfig) on this process layout."""
    t = cfg.train
    if t.offload_activations and (layout.world_size > 1 or t.engine == "deepspeed"):
        raise UserError(f"train.offload_activations recomputes blocks inside their own backward, which runs in one "
                        f"process of engine local or fsdp2 (this run: {layout.world_size} processes, engine {t.engine}); "
                        "across GPUs split the sequence with parallel.cp instead")
    return EngineSpec(
        engine=t.engine, layout=layout, bf16=uses_bf16(t.precision, layout.device.type), bf16_params=t.param_dtype == "bf16",
        accumulation=grad_accumulation(t.global_batch_tokens, cfg.data.seq_len, t.micro_batch_size, layout.dp_size,
                                       "config"),
        micro_batch_size=t.micro_batch_size, grad_clip=cfg.optim.grad_clip, compile=t.compile,
        activation_checkpointing=t.activation_checkpointing, offload_activations=t.offload_activations,
        mlp_tile_tokens=t.mlp_tile_tokens, fused_loss=t.loss_chunk_tokens > 0,
        fp8=FP8Spec(t.fp8, t.fp8_min_features, t.fp8_keep_ends, t.fp8_emulate), optim=cfg.optim,
        groups_by_role=bool(cfg.freeze.phases) or cfg.optim.name == "muon", async_checkpoint=cfg.checkpoint.async_,
        scratch_dir=Path(cfg.run_dir), deepspeed=cfg.deepspeed if t.engine == "deepspeed" else None,
        fsdp=cfg.fsdp if t.engine == "fsdp2" else None, moe_capacity_factor=cfg.moe.capacity_factor,
        moe_kernel=cfg.moe.experts)


def autocast_for(device: torch.device, bf16: bool):
    """bf16 autocast on `device` when `bf16`, else nothing (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
