"""The DeepSpeed engine: ZeRO stage 0-3 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models"), bf16, optional CPU offload, behind the loop's Engine interface.

The DeepSpeed config is generated from ours (`deepspeed_config`); `deepspeed.extra` is merged last, so
any raw DeepSpeed key can be set without a code change. The optimization is the single-process one:
the loop already scales each rank's loss by world_size / global_batch_tokens, so `backward` runs with
`scale_wrt_gas=False`, the accumulation boundary is set explicitly from the loop's `sync`, and
`engine.step()` is called once per optimizer step with the loop's LR.

Checkpoints are DeepSpeed's own (`save_checkpoint` into CKPT/deepspeed/). At another world size they
are converted to a universal checkpoint first (`deepspeed.checkpoint.ds_to_universal`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from ...errors import UserError
from ..params import Target
from .base import LossFn, build_optimizer, full_initial_state, optimizer_groups, set_lr, wrap_blocks
from .fp8 import apply_fp8
from .layout import Layout
from .spec import EngineSpec

TAG = "deepspeed"  # the checkpoint's subfolder (DeepSpeed's "tag")


@dataclass
class DeepSpeedSection:
    zero_stage: Literal[0, 1, 2, 3] = 2  # 1: shard optimizer states, 2: + gradients, 3: + parameters
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and the Adam step on CPU (stage >= 1)
    offload_params: bool = False  # parameters on CPU between uses (stage 3 only)
    optimizer: Literal["auto", "torch", "deepspeed"] = "auto"  # torch AdamW, or DeepSpeed's fused/CPU Adam (JIT-built; auto: on GPU only)
    # Under train.compile: DeepSpeed's DeepCompile (the whole model compiled, ZeRO's gathers and
    # reductions scheduled as graph passes) instead of torch.compile per block (ZeRO-1/2) or per region (ZeRO-3).
    deepcompile: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed config keys, deep-merged last

    def check(self, train, bf16: bool, device_type: str, src: str) -> None:
        """Checks that need the train section and the device the run resolves to (called at config load)."""
        if self.deepcompile and train.compile and device_type != "cuda":
            raise UserError(f"{src}: deepspeed.deepcompile needs a CUDA device (its ops are CUDA-only); "
                            "set deepspeed.deepcompile=false on CPU")
        if self.zero_stage == 0 and bf16:
            raise UserError(f"{src}: deepspeed.zero_stage=0 in bf16 trains bf16 weights with bf16 gradient accumulation "
                            "(no fp32 master copy); use deepspeed.zero_stage >= 1, or train.engine=local for plain data parallelism")

    def __post_init__(self):
        if self.offload_params and self.zero_stage != 3:
            raise UserError("deepspeed.offload_params needs deepspeed.zero_stage=3; raise the stage or drop the offload")
        if self.offload_optimizer and self.zero_stage == 0:
            raise UserError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _use_ds_optimizer(spec: EngineSpec) -> bool:
    # DeepSpeed's config optimizer JIT-compiles fused_adam (~50 s on CPU): GPU only by default.
    return spec.deepspeed.optimizer == "deepspeed" or (spec.deepspeed.optimizer == "auto" and spec.layout.device.type == "cuda")


def deepspeed_config(spec: EngineSpec) -> dict:
    """Our spec -> DeepSpeed's config (before `deepspeed.extra` is merged in)."""
    ds, device = spec.deepspeed, spec.layout.device
    pin = device.type == "cuda"
    zero: dict = {"stage": ds.zero_stage, "overlap_comm": ds.zero_stage >= 2 and device.type == "cuda"}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    conf = {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.accumulation,
        "gradient_clipping": spec.grad_clip,
        # check_grad_overflow: a non-finite gradient norm skips the update on every rank (fp32 does so already).
        "bf16": {"enabled": spec.bf16, "check_grad_overflow": True},
        # Gradients accumulate over micro-batches in fp32, as the other engines do (the default under
        # bf16 would be bf16 buffers, which lose the low bits of each added micro-batch).
        "data_types": {"grad_accum_dtype": "fp32"} if ds.zero_stage >= 1 else {},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # a torch AdamW may run the offloaded step
        "compile": {"deepcompile": ds.deepcompile and spec.compile},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if _use_ds_optimizer(spec):
        o = spec.optim
        conf["optimizer"] = {"type": "AdamW", "params": {"lr": 0.0, "betas": [o.beta1, o.beta2], "eps": o.eps,
                                                         "weight_decay": o.weight_decay}}
    return conf


def _init_comm(layout: Layout) -> None:
    """Join (or, for a plain single process, create) the process group DeepSpeed communicates over."""
    import importlib

    import deepspeed

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` as an attribute is torch itself
    # The CPU shared-memory all-reduce op JIT-compiles (~30 s) and leaves ~66 MB per rank in /dev/shm
    # that is never freed; gloo is fast enough for CPU runs.
    if layout.device.type == "cpu":
        ds_torch.build_shm_op = lambda: None
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    deepspeed.init_distributed(dist_backend="nccl" if layout.device.type == "cuda" else "gloo")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeepSpeedEngine:
    def __init__(self, model, spec: EngineSpec, initial_state: dict | None):
        layout, ds = spec.layout, spec.deepspeed
        if layout.device.type == "cuda":  # a DeepSpeed wheel built without CUDA would otherwise pick the CPU accelerator
            os.environ.setdefault("DS_ACCELERATOR", "cuda")
        import deepspeed

        if ds.zero_stage == 3 and spec.fused_loss:
            raise UserError("train.loss_chunk_tokens needs engine fsdp2 or deepspeed.zero_stage <= 2: ZeRO-3 gathers "
                            "parameters only inside module forwards; set train.loss_chunk_tokens=0")
        _init_comm(layout)
        self.spec, self.layout = spec, layout
        self.sharded = ds.zero_stage == 3
        conf = _merge(deepspeed_config(spec), ds.extra)
        full = full_initial_state(model, initial_state, layout)
        module = _build_zero3(model.cfg, conf, full) if ds.zero_stage == 3 else _build_replicated(model, full, layout)
        # The full weights' host copy (4 bytes a parameter, 32 GB at 8B) is spent once they are in
        # place; emptied now, it is not held beside what deepspeed.initialize allocates in the same host
        # memory under optimizer offload (12 more bytes a parameter). The caller's dict is emptied too.
        for state in (full, initial_state):
            if state:
                state.clear()
        apply_fp8(module, spec.fp8, layout.device)  # ZeRO-1/2 (config load refuses FP8 under ZeRO-3)
        deepcompile = conf["compile"]["deepcompile"]
        wrap_blocks(module, spec, compile_blocks=spec.compile and not deepcompile, regions=ds.zero_stage == 3)
        groups = optimizer_groups(module, spec)
        client = None
        if not _use_ds_optimizer(spec):
            client = build_optimizer(groups, spec.optim, layout.device)
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=client, model_parameters=groups,
                                                                config=conf)
        self.module = module
        _overflow_from_the_norm(self.model.optimizer)
        if deepcompile:
            self.model.compile()
        # Each parameter group's hyperparameters as configured (weight decay differs between groups).
        self._group_settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    def forward_backward(self, batch: dict, loss_fn: LossFn, sync: bool) -> dict:
        # The loop scales the loss for accumulation itself; DeepSpeed reduces at the boundary we set.
        self.model.set_gradient_accumulation_boundary(sync)
        loss, stats = loss_fn(self.model, batch)
        self.model.backward(loss, scale_wrt_gas=False)
        return stats

    def step(self, lr: float) -> float:
        set_lr(self.optimizer, lr)
        if hasattr(self.model.optimizer, "_global_grad_norm"):
            # ZeRO (and bf16) optimizers clip, measure, and skip a non-finite step themselves (norm inf).
            self.model.step()
            return float(self.model.get_global_grad_norm())
        # ZeRO stage 0 in fp32 steps the bare torch optimizer, which records no norm; the gradients
        # were all-reduced at the boundary backward, so every rank measures the same norm.
        clip = self.spec.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip if clip > 0 else float("inf"))
        if torch.isfinite(norm):
            self.model.step()
        else:
            self.zero_grad()
        return float(norm)

    def zero_grad(self) -> None:
        self.model.optimizer.zero_grad(set_to_none=True)

    def save(self, path: Path) -> list[Path]:
        self.model.save_checkpoint(str(path), tag=TAG, save_latest=False)
        # Each rank's partition is zero_pp_rank_<rank>_mp_rank_*; what rank 0 writes besides (model
        # states, DeepSpeed's zero_to_fp32.py) is hashed by the checkpoint's publisher.
        return sorted((path / TAG).glob(f"*zero_pp_rank_{self.layout.rank}_mp_rank_*"))

    def save_async(self, path: Path):
        """DeepSpeed writes its checkpoints synchronously (config load refuses checkpoint.async with this
        engine): the files are written now, the returned function only names them."""
        files = self.save(path)
        return lambda: files

    def load(self, path: Path, optimizer: bool) -> None:
        if not (path / TAG).is_dir():
            raise UserError(f"{path}: no {TAG}/ folder; was it saved with train.engine=deepspeed?")
        saved_world = json.loads((path / "trainer_state.json").read_text()).get("world_size", self.layout.world_size)
        if saved_world == self.layout.world_size or self.spec.deepspeed.zero_stage == 0:
            self._load(path, optimizer)
            return
        # ZeRO partitions are per rank: another world size needs the universal (per-parameter) format,
        # converted into this run's directory (removed after), never beside the source checkpoint.
        universal = self.spec.scratch_dir / f".tmp-universal-{path.name}"
        if self.layout.is_main:
            to_universal(path / TAG, universal / TAG, self.spec.deepspeed.zero_stage)
        dist.barrier()
        self.model._config.load_universal_checkpoint = True  # read at load time only
        try:
            self._load(universal, optimizer)
        finally:
            self.model._config.load_universal_checkpoint = False
            dist.barrier()
            if self.layout.is_main:
                shutil.rmtree(universal, ignore_errors=True)

    def _load(self, folder: Path, optimizer: bool) -> None:
        self.model.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=optimizer, load_lr_scheduler_states=False,
                                   load_module_only=not optimizer)
        # Two mends for ZeRO-3's universal load (DeepSpeed 0.19.8), which (a) hands every parameter
        # sub-group the same `step` tensor, which torch's AdamW then advances once per group per step, and
        # (b) gives every parameter group the first group's settings (weight decay on the norms): each
        # step tensor gets its own copy, each group its configured settings.
        inner = getattr(self.model.optimizer, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        for group, settings in zip(self.optimizer.param_groups, self._group_settings):
            group.update(settings)

    def full_state_dict(self) -> dict:
        """The fp32 master weights (collective under ZeRO-3: every rank must call it)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.module.named_parameters():
            full = safe_get_full_fp32_param(p)  # None at stage 0 in fp32, where the module holds the master
            out[name] = (p if full is None else full).detach().float().cpu().clone()
        return out

    def targets(self, pattern: str) -> list[Target]:
        import re

        params = [(n, p) for n, p in self.module.named_parameters() if re.fullmatch(pattern, n)]
        opt = self.model.optimizer
        if self.spec.deepspeed.zero_stage == 3:
            return _zero3_targets(params, opt)
        if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
            return _zero12_targets(params, opt, opt.bit16_groups_flat, opt.single_partition_of_fp32_groups)
        if hasattr(opt, "fp32_groups_flat_partition"):  # DeepSpeed's BF16 optimizer (ZeRO-1 in bf16)
            return _zero12_targets(params, opt, opt.bf16_groups_flat, opt.fp32_groups_flat_partition)
        return [Target(n, tuple(p.shape), 0, p.data.view(-1), [(0, p.numel(), p.data.view(-1))]) for n, p in params]

    def sync_written(self, targets: list[Target]) -> None:
        """ZeRO-3 keeps small ("persistent") parameters gathered between steps, and forwards read that
        full copy: release it and gather it again from the written partitions (a gather alone skips
        parameters that are still available)."""
        names = {t.name for t in targets}
        persistent = [p for n, p in self.module.named_parameters() if n in names and getattr(p, "ds_persist", False)]
        if persistent:
            persistent[0].partition(persistent)
            persistent[0].all_gather(persistent)


def _offset(view: torch.Tensor, base: torch.Tensor) -> int:
    return (view.data_ptr() - base.data_ptr()) // base.element_size()


def _zero12_targets(params, opt, flats, masters) -> list[Target]:
    """ZeRO-1/2 (and DeepSpeed's BF16 optimizer): full parameters on every rank, views into a flat
    buffer whose rank-th partition has an fp32 master copy. Selection reads the full (replicated)
    parameter; a write must also reach the master slice, else the next step would undo it."""
    out = []
    for name, p in params:
        i = next(i for i, f in enumerate(flats) if f.data_ptr() <= p.data_ptr() < f.data_ptr() + f.numel() * f.element_size())
        group = opt.real_dp_process_group[i] if hasattr(opt, "real_dp_process_group") else None
        size, rank, off = masters[i].numel(), dist.get_rank(group), _offset(p.data, flats[i])
        full = p.data.view(-1)
        copies = [(0, full.numel(), full)]
        lo, hi = max(off, rank * size), min(off + full.numel(), (rank + 1) * size)
        if lo < hi:
            copies.append((lo - off, hi - off, masters[i][lo - rank * size:hi - rank * size]))
        out.append(Target(name, tuple(p.shape), 0, full, copies))
    return out


def _zero3_targets(params, opt) -> list[Target]:
    """ZeRO-3: each rank holds partition `rank` of every parameter (ds_tensor, inside a flat
    sub-group buffer) and its fp32 master in the matching slice of the fp32 flat buffer."""
    out = []
    for name, p in params:
        part = p.ds_tensor
        i = next(i for i, g in enumerate(opt.fp16_partitioned_groups) if any(t is part for t in g))
        flat16, flat32 = opt.fp16_partitioned_groups_flat[i], opt.fp32_partitioned_groups_flat[i]
        start = dist.get_rank(p.ds_process_group) * part.ds_numel
        n = max(0, min(part.ds_numel, p.ds_numel - start))
        off = _offset(part, flat16)
        master = flat32[off:off + n]
        copies = [(0, n, master)] + ([(0, n, part.view(-1)[:n])] if flat32.data_ptr() != flat16.data_ptr() else [])
        out.append(Target(name, tuple(p.ds_shape), start, master, copies))
    return out


def _overflow_from_the_norm(optimizer) -> None:
    """ZeRO-1/2 (DeepSpeed 0.19.8) finds a non-finite step twice: first a scan of every gradient
    (six small kernels each, 272 gradients at 135M, and a host sync), then the global norm, which
    marks the step overflowed when it is not finite, under bf16 only while that scan is configured on
    (`check_grad_overflow`, which stays on). The scan is dropped: the norm alone decides, and it is
    all-reduced, so every rank skips the same step. The norm itself is taken as torch's clip does
    (foreach kernels, fp32) instead of one fp64 copy and norm per gradient. On one GPU the two were
    most of ZeRO-2's optimizer step (docs/benchmarks.md). Offload keeps DeepSpeed's own: its overflow
    flag comes free with the copy to the host, and its norm is taken on the host."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return
    if not all(callable(getattr(optimizer, m, None)) for m in ("check_overflow", "get_grad_norm_direct")):
        return  # another DeepSpeed than the pinned one: its own (correct, slower) checks stay

    def grad_norm(gradients, params, norm_type=2):
        # `params` serves pipeline and tensor parallelism, which this engine does not build.
        if norm_type != 2:
            raise ValueError(f"ZeRO's gradient norm is L2 here, not {norm_type}")
        grads = [g for g in gradients if g is not None and not getattr(g, "_zero_padding", False)]
        squared = (torch.nn.utils.get_total_norm(grads, 2.0).square() if grads
                   else torch.zeros((), device=optimizer.device))
        dist.all_reduce(squared, group=optimizer.dp_process_group)
        norm = squared.sqrt()
        return norm.masked_fill_(~torch.isfinite(norm), -1.0)  # DeepSpeed's sentinel for an invalid norm

    optimizer.check_overflow = lambda partition_gradients=True: None
    optimizer.get_grad_norm_direct = grad_norm


def _build_replicated(model, full: dict | None, layout: Layout):
    """ZeRO 0-2 keep every parameter on every rank: materialize, then take rank 0's weights."""
    model.to_empty(device=layout.device)
    if layout.is_main:
        model.load_state_dict(full, strict=True)
    for p in model.parameters():  # the same weights everywhere before DeepSpeed flattens them
        if dist.get_world_size() > 1:
            dist.broadcast(p.data, src=0)
    return model


def _build_zero3(arch, conf: dict, full: dict | None):
    """Build the model under `deepspeed.zero.Init`, so each module's parameters are partitioned as soon
    as they exist (peak memory: one module, not the model), then copy rank 0's weights in one module at
    a time."""
    import deepspeed

    from ...model.decoder import Decoder

    with torch.random.fork_rng(), deepspeed.zero.Init(config_dict_or_path=conf):
        module = Decoder(arch)
    for sub in module.modules():
        params = list(sub.parameters(recurse=False))
        if params:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
                if dist.get_rank() == 0:
                    prefix = next(n for n, m in module.named_modules() if m is sub)
                    for name, p in sub.named_parameters(recurse=False):
                        p.copy_(full[f"{prefix}.{name}" if prefix else name])
    # The head reads the output (or tied embedding) weight outside that module's forward.
    head = module.tok_embeddings.weight if module.output is None else module.output.weight
    deepspeed.zero.register_external_parameter(module, head)
    return module


def to_universal(src: Path, out: Path, zero_stage: int) -> None:
    """DeepSpeed's own converter, in a subprocess (it forks extraction workers)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(out), "--num_extract_workers", "1"]
    if zero_stage < 3:
        cmd.append("--inject_missing_state")  # ZeRO-1/2 checkpoints lack the universal metadata
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {src}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def consolidate(path: Path) -> dict:
    """The full fp32 weights of a DeepSpeed checkpoint folder (any stage, any world size), on CPU."""
    folder = Path(path) / TAG
    if not folder.is_dir():
        raise UserError(f"{path}: no {TAG}/ folder; this is not a complete DeepSpeed checkpoint")
    if any(folder.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG)
    else:  # stage 0 keeps the module whole
        state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float().contiguous() for k, v in state.items()}
