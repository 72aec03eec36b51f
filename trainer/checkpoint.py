"""Checkpoint directories that are either complete or invisible.

A checkpoint is written into `checkpoints/.tmp-<name>/` by every rank, then rank 0 writes a
manifest of file sizes and xxh3 checksums, fsyncs, renames the folder to `checkpoints/<name>/` and
only then moves `checkpoints/latest`. A crash at any moment leaves the previous checkpoint and
`latest` intact. Resume takes the newest checkpoint whose manifest verifies and says which it
skipped and why.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import xxhash

from ..errors import UserError

MANIFEST = "manifest.json"
STATE = "trainer_state.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _file_hash(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    entries = {}
    for p in _files(folder):
        entries[str(p.relative_to(folder))] = {"size": p.stat().st_size, "xxh3": _file_hash(p)}
        _fsync(p)
    _atomic_write(folder / MANIFEST, json.dumps({"files": entries}, indent=1))


def verify(folder: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete write)"
    try:
        entries = json.loads(manifest.read_text())["files"]
        checks = [(str(rel), int(meta["size"]), str(meta["xxh3"])) for rel, meta in entries.items()]
    except (ValueError, KeyError, TypeError, AttributeError):  # a damaged manifest, whatever the damage
        return "manifest unreadable"
    if not checks:
        return "manifest lists no files"
    for rel, size, digest in checks:
        p = folder / rel
        if not p.is_file():
            return f"{rel} missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, manifest says {size} (truncated?)"
        if _file_hash(p) != digest:
            return f"{rel} checksum mismatch (corrupted)"
    return None


def _step_of(folder: Path) -> int:
    try:
        return int(folder.name.split("-")[-1])
    except ValueError:
        return -1


def list_checkpoints(root: Path) -> list[Path]:
    """Visible checkpoint folders, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _step_of(p) >= 0), key=_step_of, reverse=True)


def find_resume(run_dir: Path, log=print) -> Path | None:
    """The newest checkpoint of the run that verifies; reports the ones skipped."""
    for ckpt in list_checkpoints(Path(run_dir) / "checkpoints"):
        reason = verify(ckpt)
        if reason is None:
            return ckpt
        log(f"skipping checkpoint {ckpt}: {reason}")
    return None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(folder: Path, rank: int) -> bool:
    path = folder / f"rng-rank{rank}.pt"
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def _prune(root: Path, keep_last: int, fresh: Path) -> None:
    """Keep `fresh` (just written and hashed: good by construction) and the keep_last - 1 newest
    checkpoints before it; delete older ones. Checkpoints with a later step than `fresh` exist only
    when a resume or rollback skipped them as damaged: they are neither counted nor deleted (left
    for inspection), so a damaged newer folder can never push the only good checkpoint out."""
    older = [c for c in list_checkpoints(root) if _step_of(c) < _step_of(fresh)]
    for old in older[keep_last - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, engine, state: dict, config_text: str, model_cfg_json: str,
                    rank: int, keep_last: int, before_publish=None) -> Path:
    """Collective: every rank calls it. Returns the final folder. `before_publish` (a debugging
    hook, faults.debug_checkpoint_delay_s) runs on rank 0 between writing the files and the rename."""
    root = Path(run_dir) / "checkpoints"
    name = f"step-{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        for stale in root.glob(".tmp-*") if root.is_dir() else ():  # left by a killed save; never visible
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save(tmp)
    torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        (tmp / "config.yaml").write_text(config_text)
        (tmp / "model_config.json").write_text(model_cfg_json)
        if before_publish is not None:
            before_publish()
        write_manifest(tmp)
        replaced = root / f".tmp-replaced-{name}"
        if final.exists():  # the same step saved again: hide the old one first, so a crash leaves a good one
            final.rename(replaced)
        tmp.rename(final)
        shutil.rmtree(replaced, ignore_errors=True)
        _fsync(root)
        _atomic_write(root / "latest", name + "\n")
        _prune(root, keep_last, final)
    _barrier()
    return final


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE).read_text())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run directory / checkpoints folder meaning its newest good checkpoint."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such checkpoint or run directory; check the path")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.name == "checkpoints":
        found = find_resume(p.parent)
        if found is None:
            raise UserError(f"{p}: no complete checkpoint found; train until one is saved or name a checkpoint folder")
        return found
    return p


def is_hf_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "model_config.json").is_file()


def model_config_of(path: str | Path):
    """The LlamaConfig of an HF folder, a cptrain weights/checkpoint folder, or a run directory."""
    from ..model.config import LlamaConfig, from_hf_config

    p = Path(path)
    if is_hf_folder(p):
        return from_hf_config(json.loads((p / "config.json").read_text()), source=str(p / "config.json"))
    p = resolve_checkpoint(p)
    f = p / "model_config.json"
    if not f.is_file():
        raise UserError(f"{p}: neither an HF folder (config.json) nor a cptrain checkpoint (model_config.json); pass one of those")
    return LlamaConfig.from_dict(json.loads(f.read_text()), source=str(f))


def load_full_weights(path: str | Path):
    """(LlamaConfig, full state dict) from an HF folder, any engine's checkpoint or a weights folder."""
    from ..model.hf import load_hf_dir, load_weights

    if is_hf_folder(path):
        return load_hf_dir(path)
    p = resolve_checkpoint(path)
    if (p / "model.safetensors").is_file():
        return load_weights(p)
    engine = read_state(p).get("engine", "local") if (p / STATE).is_file() else "local"
    if engine == "deepspeed":
        from .engines.deepspeed import consolidate
    elif engine == "fsdp2":
        from .engines.fsdp import consolidate
    else:
        raise UserError(f"{p}: no model.safetensors in this checkpoint; is the folder complete?")
    return model_config_of(p), consolidate(p)
