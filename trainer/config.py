"""The one config schema: nested dataclasses loaded from YAML plus `--section.key=value` overrides.

Every key is checked at load time - unknown keys (with a did-you-mean), wrong types, bad values -
so a typo fails in a second with the key path, not an hour into a run. Each section's dataclass
lives with the code that owns it (ModelConfig in model/, DataConfig in data_pipeline/,
ScheduleConfig in trainer/schedule.py); this file composes them.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import keyword
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..data_pipeline.config import DataConfig
from ..data_pipeline.remote import local_path
from ..data_pipeline.seqlen import check_schedule, schedule_lengths
from ..errors import UserError
from ..model.config import ModelConfig
from ..model.extend import ExtendConfig, extend_rope
from ..model.presets import preset
from .continual import ContinualSection
from .engines.deepspeed import DeepSpeedSection
from .engines.context import check as context_check
from .engines.layout import ParallelSection, resolve_device
from .engines.spec import grad_accumulation, uses_bf16
from .faults import FaultsSection
from .freezing import FreezeConfig
from .moe import MoESection
from .passkey import PasskeyConfig
from .positions import Buckets
from .tasks import TaskConfig
from . import trackers
from .trackers import MlflowSection, WandbSection
from .engines.fsdp import FSDPSection
from .schedule import ScheduleConfig
from .reweighting import ReweightingConfig
from .sparsity import SparsityConfig

_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


@dataclass
class ModelSection:
    preset: str = "tiny"  # a named shape from cptrain.model.presets.PRESETS; ignored when init_from gives one
    init_from: str = ""  # HF folder or cptrain checkpoint/weights folder to start from
    load: Literal["weights", "weights+optimizer", "all"] = "weights"  # what init_from restores (cptrain checkpoints)
    reset_optimizer: bool = False  # with load=weights+optimizer/all: zero the Adam moments anyway
    extend: ExtendConfig = field(default_factory=ExtendConfig)  # a longer window: RoPE method, factor or base, new max_seq_len (model/extend.py)
    arch: ModelConfig | None = None  # resolved shape: preset (or init_from), extended, plus the keys given in YAML


@dataclass
class TrainSection:
    engine: Literal["local", "deepspeed", "fsdp2"] = "local"  # how the model is parallelized (local = 1 process or DDP)
    max_tokens: int = 10_000_000  # training budget; steps = max_tokens / global_batch_tokens
    global_batch_tokens: int = 65536  # tokens per optimizer step, fixed whatever the world size
    micro_batch_size: int = 8  # sequences per rank per forward/backward; accumulation fills the rest
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    offload_activations: bool = False  # with activation_checkpointing: each block's saved input waits in pinned host memory (one process)
    mlp_tile_tokens: int = 0  # >0: the MLP runs over tiles of this many positions, each checkpointed (long sequences)
    # bf16: the weights, their gradients and AdamW's state in bf16 with no fp32 master copy, half their memory (engine
    # local; the 8B preset at 128K on one GPU). Pair it with optim.name=adamw8bit, whose stochastic rounding keeps the
    # updates under half a bf16 step that plain AdamW on bf16 weights loses late in a decay.
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    loss_chunk_tokens: int = 0  # >0: cross-entropy in chunks of this many tokens (full logits never materialized)
    fp8: Literal["off", "tensorwise", "rowwise"] = "off"  # FP8 matmuls in the block linears (torchao; trainer/engines/fp8.py)
    fp8_min_features: int = 1024  # with fp8: linears narrower than this stay in bf16
    fp8_keep_ends: bool = True  # with fp8: the first and last blocks stay in bf16
    fp8_emulate: bool = False  # DEBUG: emulate FP8 matmuls (CPU tests); never in a real run
    ema_decay: float = 0.0  # an EMA of the weights (e.g. 0.999) kept and checkpointed (trainer/averaging.py); 0: none
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = look up the device (H100/H200: 989 bf16 dense)


@dataclass
class OptimSection:
    # muon: Muon for the blocks' matrices, AdamW for the rest (trainer/muon.py). adamw8bit: AdamW with its moments
    # block-quantized to 8 bits (torchao's AdamW8bit, Dettmers et al. 2022): a quarter of fp32 moments' memory, and
    # bf16 parameters updated with stochastic rounding; for one GPU that runs out of memory (train.engine=local)
    name: Literal["adamw", "adamw8bit", "muon"] = "adamw"
    weight_decay: float = 0.1  # decoupled decay on matrices (both optimizers); norms and embeddings are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: Literal["auto", "on", "off"] = "auto"  # fused AdamW kernel (auto: on for CUDA; name=adamw only)
    muon_momentum: float = 0.95  # with name=muon: Nesterov momentum of the matrices
    muon_ns_steps: int = 5  # with name=muon: Newton-Schulz iterations per update


@dataclass
class EvalSection:
    interval_tokens: int = 0  # evaluate every this many tokens (0: only at the end)
    max_samples: int = 64  # validation samples per domain per evaluation
    at_start: bool = True  # evaluate before the first step (the baseline for forgetting)
    tasks: list[TaskConfig] = field(default_factory=list)  # multiple-choice tasks scored with the validation sets (trainer/tasks.py)
    task_batch_size: int = 16  # requests (choices) per forward when scoring tasks
    # Validation loss by token position (trainer/positions.py): [0, 1024, 4096] also logs val/<domain>/pos0-1024,
    # pos1024-4096 and pos4096-<data.seq_len>, the mean loss of the targets at those positions of the rows.
    position_buckets: list[int] = field(default_factory=list)
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)  # passkey retrieval at given lengths, logged as eval/passkey/<length> (trainer/passkey.py)


@dataclass
class CheckpointSection:
    interval_tokens: int = 0  # save every this many tokens (0: only at the end)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted after a newer one is complete
    at_end: bool = True
    # YAML key `async`: the engine's files are written by a background thread while training goes on;
    # the checkpoint becomes visible once complete (engines local and fsdp2).
    async_: bool = False


@dataclass
class LogSection:
    interval_steps: int = 1  # write metrics.jsonl every this many steps
    tensorboard: bool = False  # also write tensorboard event files under RUN_DIR/tb
    progress: bool = True  # progress bar with loss, tokens/s and ETA
    wandb: WandbSection = field(default_factory=WandbSection)  # Weights & Biases, on rank 0 (trainer/trackers.py)
    mlflow: MlflowSection = field(default_factory=MlflowSection)  # MLflow, on rank 0 (trainer/trackers.py)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"  # where config.yaml, metrics.jsonl and checkpoints/ go
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)  # with train.engine=deepspeed (trainer/engines/deepspeed.py)
    fsdp: FSDPSection = field(default_factory=FSDPSection)  # with train.engine=fsdp2 (trainer/engines/fsdp.py)
    parallel: ParallelSection = field(default_factory=ParallelSection)  # context and expert parallelism (trainer/engines/layout.py)
    faults: FaultsSection = field(default_factory=FaultsSection)  # signals, NaNs, loss spikes (trainer/faults.py)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)  # pruning and sparse-then-dense (trainer/sparsity.py)
    reweighting: ReweightingConfig = field(default_factory=ReweightingConfig)  # loss-based sample and domain weights (trainer/reweighting.py)
    continual: ContinualSection = field(default_factory=ContinualSection)  # old/new domains, forgetting report (trainer/continual.py)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)  # phases that train only new vocabulary rows (trainer/freezing.py)
    moe: MoESection = field(default_factory=MoESection)  # router losses, balancing, capacity of a mixture of experts (trainer/moe.py)


# ---------------------------------------------------------------- generic dataclass <- dict

def parse_int(value: Any, path: str, src: str) -> int:
    if isinstance(value, bool):
        raise UserError(f"{src}: {path} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([KMBT]?)\s*", value, re.IGNORECASE)
        if m:
            number = float(m.group(1)) * _SUFFIX.get(m.group(2).upper(), 1)
            if number.is_integer():
                return int(number)
    raise UserError(f"{src}: {path} must be an integer (suffixes K/M/B/T allowed), got {value!r}")


def _coerce(tp: Any, value: Any, path: str, src: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path, src)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("on" if value else "off") in choices:
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as true/false
        if value not in choices or (isinstance(value, bool) and not any(c is value for c in choices)):  # true is not 1
            raise UserError(f"{src}: {path} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{src}: {path} must be a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, v, f"{path}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict or tp is dict:  # a bare `dict` too (ModelConfig.rope_scaling)
        if not isinstance(value, dict):
            raise UserError(f"{src}: {path} must be a mapping, got {value!r}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(item, v, f"{path}.{k}", src) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path, src)
    if tp is Any:
        return value
    if tp is int:
        return parse_int(value, path, src)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{src}: {path} must be a number, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{src}: {path} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{src}: {path} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"config type {tp!r} at {path} is not supported by the loader")


def from_dict(cls: type, data: Any, path: str = "", src: str = "config") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type; `path` names the key in errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{src}: {path or 'the config'} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and keyword.iskeyword(key):
            key = key + "_"  # a YAML key that is a Python keyword (`async`) names the field `async_`
        if key not in fields:
            key_path = key_path if key_path.isprintable() else repr(key_path)[1:-1]  # keep the error on one line
            close = difflib.get_close_matches(str(key), [_yaml_key(f) for f in fields], n=1)
            hint = f"; did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else f"; valid keys: {', '.join(map(_yaml_key, fields))}"
            raise UserError(f"{src}: unknown key '{key_path}'{hint}")
        kwargs[key] = _coerce(hints[key], value, key_path, src)
    try:
        return cls(**kwargs)
    except UserError as e:
        raise UserError(f"{src}: {e}") from None


def _yaml_key(field_name: str) -> str:
    return field_name[:-1] if field_name.endswith("_") and keyword.iskeyword(field_name[:-1]) else field_name


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_yaml_key(f.name): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------- loading

def _apply_override(raw: dict, override: str, src: str) -> None:
    m = re.fullmatch(r"--([A-Za-z_][\w.]*)=(.*)", override, re.DOTALL)
    if not m:
        raise UserError(f"override {override!r} must look like --section.key=value (e.g. --train.max_tokens=10M)")
    keys = m.group(1).split(".")
    try:
        value = yaml.safe_load(m.group(2)) if m.group(2) != "" else ""
    except yaml.YAMLError as e:
        raise UserError(f"override {override!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote or fix it") from None
    node = raw
    for k in keys[:-1]:
        if node.get(k) is None:  # absent, or an empty `section:` in the YAML
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            raise UserError(f"override {override!r}: '{k}' is not a section")
    node[keys[-1]] = value


def _resolve_model(raw: dict, src: str) -> ModelSection:
    """The model section is flat in YAML (preset, init_from, extend and any ModelConfig key); the shape is
    the preset's (or init_from's), extended by `extend`, with the given keys replaced."""
    raw = dict(raw or {})
    if "arch" in raw:  # a resolved config written by a previous run
        raw.update(raw.pop("arch") or {})
    own = ("preset", "init_from", "load", "reset_optimizer", "extend")
    section = from_dict(ModelSection, {k: raw.pop(k) for k in own if k in raw}, "model", src)
    if section.init_from:
        from .checkpoint import model_config_of

        base = model_config_of(section.init_from)
        shape_keys = {"vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings"}
        clash = sorted(shape_keys & raw.keys())
        if clash and any(raw[k] != getattr(base, k) for k in clash):
            raise UserError(f"{src}: model.{clash[0]} conflicts with the shape of {section.init_from}; remove it (the checkpoint sets the shape)")
    else:
        base = preset(section.preset)
    base = extend_rope(base, section.extend, src)
    arch = from_dict(ModelConfig, {**to_dict(base), **raw}, "model", src)
    # The extension sets these; given as well (a run's resolved config repeats them) they must agree.
    clash = [k for k in ("rope_theta", "rope_scaling", "max_seq_len") if getattr(arch, k) != getattr(base, k)]
    if clash and section.extend.method != "off":
        raise UserError(f"{src}: model.{clash[0]} conflicts with model.extend, which sets it to "
                        f"{getattr(base, clash[0])!r}; remove one of them")
    arch.validate()
    section.arch = arch
    return section


def load_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (or None for defaults) + `--a.b=value` overrides -> a validated TrainConfig."""
    src = str(path) if path else "config"
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: config file not found; pass the path of a YAML config (see trainer/configs/)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
        if not isinstance(raw, dict):
            raise UserError(f"{p}: the top level must be a mapping of sections")
    for o in overrides or []:
        _apply_override(raw, o, src)
    model_raw = raw.pop("model", {})
    if model_raw is not None and not isinstance(model_raw, dict):
        raise UserError(f"{src}: model must be a mapping of keys")
    cfg = from_dict(TrainConfig, raw, "", src)
    cfg.model = _resolve_model(model_raw, src)
    _check(cfg, src)
    return cfg


def _check(cfg: TrainConfig, src: str) -> None:
    paths = [("run_dir", cfg.run_dir), ("model.init_from", cfg.model.init_from), ("data.cache_dir", cfg.data.cache_dir)]
    for key, value in paths + [(f"eval.tasks[{i}].path", t.path) for i, t in enumerate(cfg.eval.tasks)]:
        local_path(value, f"{src}: {key}")  # only data domains may be URLs (validate_data checks their scheme)
    t = cfg.train
    seq = cfg.data.seq_len
    if t.micro_batch_size <= 0 or t.max_tokens <= 0 or t.global_batch_tokens <= 0:
        raise UserError(f"{src}: train.micro_batch_size, train.max_tokens and train.global_batch_tokens must be positive")
    grad_accumulation(t.global_batch_tokens, seq, t.micro_batch_size, 1, src)  # one process; the run checks its own
    if seq > cfg.model.arch.max_seq_len:
        raise UserError(f"{src}: data.seq_len={seq} exceeds model.max_seq_len={cfg.model.arch.max_seq_len}; raise model.max_seq_len")
    if t.offload_activations and not t.activation_checkpointing:
        raise UserError(f"{src}: train.offload_activations parks the inputs activation checkpointing keeps; "
                        "set train.activation_checkpointing=true")
    if t.mlp_tile_tokens < 0:
        raise UserError(f"{src}: train.mlp_tile_tokens={t.mlp_tile_tokens} must be >= 0 (0: no tiling)")
    if t.param_dtype == "bf16" and t.engine != "local":
        raise UserError(f"{src}: train.param_dtype=bf16 needs train.engine=local ({t.engine} keeps fp32 weights and shards "
                        "them across GPUs instead); set train.engine=local or train.param_dtype=fp32")
    if t.param_dtype == "bf16" and not uses_bf16(t.precision, resolve_device(t.device).type):
        raise UserError(f"{src}: train.param_dtype=bf16 computes in bf16, but train.precision={t.precision} resolves to fp32 "
                        "here; set train.precision=bf16")
    if cfg.model.arch.n_experts and (t.offload_activations or t.mlp_tile_tokens):
        raise UserError(f"{src}: train.offload_activations and train.mlp_tile_tokens are for dense models (a mixture of "
                        "experts' blocks also return their router statistics); set them off")
    if cfg.checkpoint.keep_last < 1:
        raise UserError(f"{src}: checkpoint.keep_last must be at least 1")
    _check_moe_parallel(cfg, src)
    check_schedule(cfg.data, src)
    for key, length in schedule_lengths(cfg.data):  # the cut comes before the context-parallel split
        context_check(cfg.parallel.cp, cfg.parallel.cp_method, cfg.model.arch, length, src, key)
    if cfg.parallel.cp > 1 and cfg.reweighting.instance.strategy != "none":
        raise UserError(f"{src}: reweighting.instance weighs whole samples by their loss, which context parallelism "
                        "splits over ranks; set reweighting.instance.strategy=none or parallel.cp=1")
    Buckets.of(cfg.eval.position_buckets, seq, f"{src}: eval.position_buckets")
    cfg.eval.passkey.check(cfg.model.arch.max_seq_len, f"{src}: eval.passkey")
    if cfg.parallel.cp > 1 and cfg.eval.passkey.lengths:
        raise UserError(f"{src}: eval.passkey scores prompts of their own length, which context parallelism does not "
                        "split; score them after the run with `cptrain eval RUN --passkey ...`, or set parallel.cp=1")
    if cfg.parallel.cp > 1 and cfg.eval.tasks:
        raise UserError(f"{src}: eval.tasks score requests of their own length, which context parallelism does not "
                        "split; score them after the run with `cptrain eval RUN --task ...`, or set parallel.cp=1")
    if t.engine == "deepspeed":
        device_type = resolve_device(t.device).type
        cfg.deepspeed.check(t, uses_bf16(t.precision, device_type), device_type, src)
    if t.fp8 != "off" and t.engine == "deepspeed" and cfg.deepspeed.zero_stage == 3:
        raise UserError(f"{src}: train.fp8 with deepspeed.zero_stage=3 is not supported (ZeRO-3's partitioned weights "
                        "bypass the FP8 linears' casts); use train.engine=fsdp2, which all-gathers weights in FP8, or ZeRO-1/2")
    if not 0.0 <= t.ema_decay < 1.0:
        raise UserError(f"{src}: train.ema_decay={t.ema_decay} must be in [0, 1) (0 keeps no EMA; 0.999 averages ~1000 steps)")
    if t.fp8_min_features < 16:
        raise UserError(f"{src}: train.fp8_min_features={t.fp8_min_features} must be at least 16 (FP8 GEMM dimensions)")
    if cfg.optim.name == "muon" and t.engine == "deepspeed":
        raise UserError(f"{src}: optim.name=muon needs train.engine local or fsdp2 (DeepSpeed flattens and partitions the "
                        "matrices that Muon orthogonalizes whole); use train.engine=fsdp2 or optim.name=adamw")
    if cfg.optim.name != "adamw" and cfg.optim.fused == "on":
        raise UserError(f"{src}: optim.fused=on is AdamW's fused kernel; with optim.name={cfg.optim.name} leave optim.fused at auto")
    if cfg.optim.name == "adamw8bit":
        if t.engine != "local":
            raise UserError(f"{src}: optim.name=adamw8bit needs train.engine=local (its quantized moments are not sharded "
                            "by FSDP2 or DeepSpeed, which cut the fp32 moments' memory across GPUs instead); set "
                            "train.engine=local or optim.name=adamw")
        if importlib.util.find_spec("torchao") is None:
            raise UserError(f"{src}: optim.name=adamw8bit needs torchao; pip install 'cptrain[fp8]' (torchao==0.18.0)")
    if cfg.checkpoint.async_ and t.engine == "deepspeed":
        raise UserError(f"{src}: checkpoint.async needs train.engine local or fsdp2 (DeepSpeed writes its checkpoints "
                        "synchronously); set checkpoint.async: false")
    cfg.moe.check(cfg.model.arch, src)
    cfg.sparsity.check(t.max_tokens, cfg.model.arch, src)
    cfg.reweighting.check(cfg, src)
    cfg.continual.check(cfg.data, src)
    trackers.check(cfg.log.wandb, cfg.log.mlflow, src)
    if cfg.freeze.phases:
        cfg.freeze.check(cfg.model.init_from, cfg.model.arch.vocab_size, src, cfg.model.arch.n_experts)
    for i, task in enumerate(cfg.eval.tasks):
        if not Path(task.path).is_file():
            raise UserError(f"{src}: eval.tasks[{i}].path {task.path!r}: no such task file; give a JSON lines file")
    stems = [t.stem for t in cfg.eval.tasks]
    if len(set(stems)) != len(stems):
        raise UserError(f"{src}: eval.tasks have repeated names {stems}; give each a distinct name")


def _check_moe_parallel(cfg: TrainConfig, src: str) -> None:
    """Expert parallelism: FSDP2 only (DeepSpeed and DDP train a mixture of experts with the experts
    data-parallel). Context parallelism: dense models only."""
    ep, arch = cfg.parallel.ep, cfg.model.arch
    if arch.n_experts and cfg.parallel.cp > 1:
        raise UserError(f"{src}: parallel.cp={cfg.parallel.cp} with a mixture of experts is not supported yet (its balancing "
                        "loss pools router statistics over whole sequences, which the context split cuts); set parallel.cp=1")
    if ep == 1:
        return
    if not arch.n_experts:
        raise UserError(f"{src}: parallel.ep={ep} splits a mixture of experts' experts, but the model ({arch.family}) has none; "
                        "set parallel.ep=1")
    if arch.n_experts % ep:
        raise UserError(f"{src}: parallel.ep={ep} does not divide the model's {arch.n_experts} experts; pick a divisor")
    if cfg.train.engine != "fsdp2":
        raise UserError(f"{src}: parallel.ep={ep} needs train.engine=fsdp2 (with {cfg.train.engine} the experts are "
                        "data-parallel: set parallel.ep=1)")


def save_config(cfg: TrainConfig, path: Path) -> None:
    d = to_dict(cfg)
    d["model"] = {k: v for k, v in d["model"].items() if k != "arch"} | d["model"]["arch"]
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(yaml.safe_dump(d, sort_keys=False))
    tmp.replace(path)
