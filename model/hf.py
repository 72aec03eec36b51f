"""HF safetensors folders (sharded too) <-> our state dict, lossless both ways; our own model-only
weights format; the `cptrain convert hf-to-cptrain` command."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .config import ModelConfig
from .decoder import Decoder
from .families import FAMILIES
from .hf_config import from_hf_config, to_hf_config

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "model_config.json"
HF_INDEX_FILE = "model.safetensors.index.json"
# save_pretrained's default shard size: big enough that most models are one file.
MAX_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def copy_tokenizer(src: Path, out: Path) -> list[str]:
    """The tokenizer at `src` (a folder's tokenizer files, or one tokenizer file; a sentencepiece
    model becomes tokenizer.model) into the folder `out`; returns the names written."""
    src = Path(src)
    pairs = ([(src, "tokenizer.model" if src.suffix == ".model" else src.name)] if src.is_file()
             else [(src / n, n) for n in TOKENIZER_FILES if (src / n).is_file()])
    for f, name in pairs:
        shutil.copy2(f, Path(out) / name)
    return [name for _, name in pairs]


def _hf_name(table: dict[str, str], name: str) -> str:
    """Our tensor name under a family's table (model/families.py): the longest key matching a prefix of
    its segments gives the HF prefix, each `*` standing for the segment it matched; the rest is kept. A
    `*` left over in the HF name stands for an expert's index: our tensor stacks one per expert (dim 0)."""
    parts, best = name.split("."), None
    for key, value in table.items():
        pattern = key.split(".")
        if len(pattern) <= len(parts) and all(p in ("*", q) for p, q in zip(pattern, parts)):
            if best is None or len(pattern) > len(best[0]):
                best = (pattern, value)
    if best is None:
        raise KeyError(f"no HF name for tensor {name!r}: add its module to the family's `tensors` table")
    pattern, value = best
    stars = iter(q for p, q in zip(pattern, parts) if p == "*")
    return ".".join([next(stars, "*") if seg == "*" else seg for seg in value.split(".")] + parts[len(pattern):])


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> the HF name, for every tensor of our state dict; a `*` in it is an expert's
    index (our tensor [E, ...] is the HF tensors of experts 0 .. E-1 stacked)."""
    with torch.device("meta"):
        ours = Decoder(cfg).state_dict()
    table = FAMILIES[cfg.family].tensors
    return {name: _hf_name(table, name) for name in ours}


def _per_expert(name: str, n: int) -> list[str]:
    return [name.replace("*", str(j)) for j in range(n)] if "*" in name else [name]


def _check_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig, source: str,
                   names: dict[str, str] | None = None) -> None:
    """Names and shapes of `sd` against those of Decoder(cfg); `names` maps our names to sd's (a name
    with a `*` to one tensor per expert, each of the shape without the leading expert dimension)."""
    with torch.device("meta"):
        want = {k: v.shape for k, v in Decoder(cfg).state_dict().items()}
    if names is not None:
        want = {hf: shape[1:] if "*" in names[k] else shape
                for k, shape in want.items() for hf in _per_expert(names[k], cfg.n_experts)}
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise UserError(f"{source}: tensors do not match the config (missing {missing[:4]}, unexpected "
                        f"{unexpected[:4]}{', ...' if len(missing) + len(unexpected) > 8 else ''}); "
                        "is the config from the same model?")
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(shape)}" for k, shape in want.items() if sd[k].shape != shape]
    if wrong:
        raise UserError(f"{source}: tensor shapes do not match the config ({'; '.join(wrong[:3])}); "
                        "is the config from the same model?")


def hf_to_cptrain(cfg: ModelConfig, hf_sd: dict[str, torch.Tensor],
                  source: str = "HF state dict") -> dict[str, torch.Tensor]:
    """HF tensors -> ours. A stored lm_head.weight of a tied model is dropped (HF ties it to the
    embedding on load); stale `rotary_emb.inv_freq` buffers of old checkpoints too."""
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        hf_sd.pop("lm_head.weight", None)
    names = name_map(cfg)
    _check_tensors(hf_sd, cfg, source, names)
    return {ours: torch.stack([hf_sd[n] for n in _per_expert(hf, cfg.n_experts)]) if "*" in hf else hf_sd[hf]
            for ours, hf in names.items()}


def cptrain_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor],
                  source: str = "state dict") -> dict[str, torch.Tensor]:
    """Our tensors -> HF names (no lm_head.weight when tied, as save_pretrained does; experts one by one)."""
    _check_tensors(sd, cfg, source)
    out = {}
    for ours, hf in name_map(cfg).items():
        out.update(zip(_per_expert(hf, cfg.n_experts), sd[ours].unbind(0)) if "*" in hf else [(hf, sd[ours])])
    return out


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: not found; {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); re-save or re-download it") from e


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: not found; the folder is incomplete, re-download or re-save it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable safetensors file ({e}); re-download or re-save it") from e


def load_hf_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An HF folder (config.json + model.safetensors, or a sharded index) -> (config, our
    state dict). Tensors keep their stored dtype."""
    path = Path(path)
    hf_cfg = _read_json(path / "config.json", "point to a Hugging Face model folder (config.json + model.safetensors)")
    cfg = from_hf_config(hf_cfg, source=str(path / "config.json"))
    index = path / HF_INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, "re-save the model with save_pretrained").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: has no 'weight_map'; re-save the model with save_pretrained")
        hf_sd, source = {}, str(index)
        for shard in sorted(set(weight_map.values())):
            hf_sd.update(_load_safetensors(path / shard))
    elif (path / "pytorch_model.bin").is_file() and not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"{path}: holds pytorch_model.bin only; re-save it as safetensors "
                        "(save_pretrained(..., safe_serialization=True))")
    else:
        hf_sd, source = _load_safetensors(path / WEIGHTS_FILE), str(path / WEIGHTS_FILE)
    return cfg, hf_to_cptrain(cfg, hf_sd, source)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise UserError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    return getattr(torch, dtype)


def _shards(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, max_bytes: int) -> list[list[str]]:
    """Greedy split of names, in order, into groups of at most max_bytes (a bigger tensor goes alone)."""
    groups, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * (dtype or t.dtype).itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def save_hf_dir(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], out: str | Path,
                dtype: torch.dtype | str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                extra_config: dict | None = None, generation_config: dict | None = None) -> Path:
    """Write an HF folder that `AutoModelForCausalLM.from_pretrained(out)` loads as the family's architecture.
    dtype None keeps each tensor's dtype; extra_config adds config.json keys (e.g. bos/eos token ids);
    generation_config, when given, is written as generation_config.json. Returns `out`."""
    out, dtype = Path(out), _as_dtype(dtype)
    hf_sd = cptrain_to_hf(cfg, state_dict)
    groups = _shards(hf_sd, dtype, max_shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    files = [WEIGHTS_FILE] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total = {}, 0
    for fname, names in zip(files, groups):
        # Cast one shard at a time, so an 8B export never holds a second full copy in memory.
        shard = {n: hf_sd[n].detach().to("cpu", dtype or hf_sd[n].dtype).contiguous() for n in names}
        save_file(shard, str(out / fname), metadata={"format": "pt"})  # transformers checks "format"
        weight_map.update({n: fname for n in names})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / HF_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    stored = dtype or next(iter(hf_sd.values())).dtype
    hf_config = {**to_hf_config(cfg), "dtype": str(stored).removeprefix("torch."), **(extra_config or {})}
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return out


def save_weights(dir: str | Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> Path:
    """Our model-only checkpoint: dir/model.safetensors (our names, dtypes kept) + dir/model_config.json."""
    dir = Path(dir)
    _check_tensors(state_dict, cfg, "state dict")
    dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return dir


def load_weights(dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state dict) from a folder written by save_weights."""
    dir = Path(dir)
    cfg_path = dir / CONFIG_FILE
    cfg = ModelConfig.from_dict(_read_json(cfg_path, "point to a cptrain weights folder "
                                           "(model_config.json + model.safetensors)"), source=str(cfg_path))
    sd = _load_safetensors(dir / WEIGHTS_FILE)
    _check_tensors(sd, cfg, str(dir / WEIGHTS_FILE))
    return cfg, sd
