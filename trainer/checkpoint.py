"""Checkpoint directories that are either complete or invisible.

A checkpoint is written into `checkpoints/.tmp-<name>/` by every rank, each rank hashing (xxh3) and
fsyncing the files it wrote itself, so the cost does not grow with the world size. Rank 0 then writes
the manifest of every file's size and hash (hashing only what no rank claimed), renames the folder
to `checkpoints/<name>/` and only then moves `checkpoints/latest`. A crash at any moment leaves the
previous checkpoint and `latest` intact. With `checkpoint.async` the engine's large files are
written by a background thread and the checkpoint is published at the first step boundary after
every rank has finished: invisible until complete, as a synchronous one.

Resume takes `latest` when it verifies, else the newest checkpoint that does, and says which it
skipped and why; rank 0 lists the candidates and every rank verifies a share of each one's files.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import xxhash

from ..errors import UserError
from . import collectives as cc

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
LATEST = "latest"


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


def _digests(folder: Path, files: list[Path]) -> dict:
    """{path relative to folder: {size, xxh3}} of `files`, each fsynced: a manifest's entries."""
    out = {}
    for p in files:
        out[str(Path(p).relative_to(folder))] = {"size": Path(p).stat().st_size, "xxh3": _file_hash(Path(p))}
        _fsync(Path(p))
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _share(entries: dict, world: int, rank: int) -> list[str]:
    """This rank's part of a manifest's files, balanced by bytes (largest first to the least loaded
    rank): the same split on every rank, whatever the world size that wrote the checkpoint."""
    load, mine = [0] * world, []
    for rel in sorted(entries, key=lambda r: (-int(entries[r]["size"]), r)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += int(entries[rel]["size"])
        if r == rank:
            mine.append(rel)
    return mine


def _read_manifest(folder: Path) -> tuple[dict, str | None]:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return {}, "no manifest (incomplete write)"
    try:
        entries = json.loads(manifest.read_text())["files"]
        entries = {str(rel): {"size": int(m["size"]), "xxh3": str(m["xxh3"])} for rel, m in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError):  # a damaged manifest, whatever the damage
        return {}, "manifest unreadable"
    return entries, None if entries else "manifest lists no files"


def _check(folder: Path, entries: dict, names: list[str]) -> str | None:
    for rel in names:
        p, size = folder / rel, entries[rel]["size"]
        if not p.is_file():
            return f"{rel} missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, manifest says {size} (truncated?)"
        if _file_hash(p) != entries[rel]["xxh3"]:
            return f"{rel} checksum mismatch (corrupted)"
    return None


def verify(folder: Path, split: bool = False) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not. split=True is
    collective: each rank checks its share of the files and every rank gets the same answer."""
    entries, reason = _read_manifest(folder)
    if not split:
        return reason or _check(folder, entries, sorted(entries))
    if reason is None:
        reason = _check(folder, entries, _share(entries, cc.world_size(), cc.rank()))
    return next((r for r in cc.all_gather_objects(reason) if r), None)


def step_of(folder: Path) -> int:
    try:
        return int(folder.name.split("-")[-1])
    except ValueError:
        return -1


def list_checkpoints(root: Path) -> list[Path]:
    """Visible checkpoint folders, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and step_of(p) >= 0), key=step_of, reverse=True)


def candidates(root: Path) -> list[Path]:
    """The checkpoints a resume tries, in order: the one `latest` names, then the others newest first."""
    found = list_checkpoints(root)
    named = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else ""
    first = [c for c in found if c.name == named]
    return first + [c for c in found if c.name != named]


def find_resume(run_dir: Path, log=print) -> Path | None:
    """The checkpoint a resume continues from, reporting the ones skipped. Collective: rank 0 lists
    the candidates, every rank verifies a share of each, and all take the same one."""
    root = Path(run_dir) / "checkpoints"
    for name in cc.on_rank0(lambda: [c.name for c in candidates(root)]):
        reason = verify(root / name, split=True)
        if reason is None:
            return root / name
        log(f"skipping checkpoint {root / name}: {reason}")
    return None


def rng_state() -> dict:
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
    older = [c for c in list_checkpoints(root) if step_of(c) < step_of(fresh)]
    for old in older[keep_last - 1:]:
        shutil.rmtree(old, ignore_errors=True)


class Checkpointer:
    """Writes one run's checkpoints. Collective: every rank calls every method at the same point of
    the loop. `engine.save(dir)` returns the files this rank wrote; with async_save,
    `engine.save_async(dir)` takes the snapshot and returns a function that finishes writing it,
    which a background thread runs. The add-ons' files (trainer/addons.py: masks, EMAs, counters) are
    written at once, also under async_save (they are host copies the next step would change), into the
    same folder before its manifest is computed, so they are checksummed and published with it.
    `before_publish` (faults.debug_checkpoint_delay_s) runs on rank 0 between the files being written
    and the rename."""

    def __init__(self, run_dir: Path, keep_last: int, async_save: bool, device: torch.device, before_publish=None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last, self.device, self.before_publish = keep_last, device, before_publish
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if async_save else None
        self._pending: tuple[Path, Path, Future] | None = None  # (tmp folder, final folder, this rank's digests)

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def save(self, step: int, engine, addons: list, state: dict, texts: dict[str, str]) -> Path | None:
        """Write checkpoint `step`; returns its folder once published (None while an async save runs).
        `texts`: file name -> content, written by rank 0 (config.yaml, model_config.json)."""
        self.wait()  # one checkpoint in flight at a time
        name = f"step-{step:08d}"
        tmp = self.root / f".tmp-{name}"
        if cc.rank() == 0:
            for stale in self.root.glob(".tmp-*") if self.root.is_dir() else ():  # left by a killed save; never visible
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        cc.barrier()
        small = [tmp / f"rng-rank{cc.rank()}.pt"]
        torch.save(rng_state(), small[0])
        if cc.rank() == 0:
            for fname, text in {STATE: json.dumps(state, indent=1), **texts}.items():
                (tmp / fname).write_text(text)
                small.append(tmp / fname)
        small += [f for a in addons for f in a.save(tmp, cc.rank())]
        if self._pool is not None:
            finish = engine.save_async(tmp)
            future = self._pool.submit(lambda: _digests(tmp, finish() + small))
        else:
            future = Future()
            future.set_result(_digests(tmp, engine.save(tmp) + small))
        self._pending = (tmp, self.root / name, future)
        return None if self._pool is not None else self._publish()

    def poll(self) -> Path | None:
        """Publish the checkpoint being written if every rank has finished it; its folder, or None."""
        if self._pending is None:
            return None
        done = torch.tensor([float(self._pending[2].done())], device=self.device)
        if cc.all_reduce(done, op=torch.distributed.ReduceOp.MIN).item() < 1:
            return None
        return self._publish()

    def wait(self) -> Path | None:
        """Finish and publish the checkpoint being written, if any; its folder, or None."""
        return self._publish() if self._pending is not None else None

    def _publish(self) -> Path:
        tmp, final, future = self._pending
        self._pending = None
        try:
            mine = ("ok", future.result())
        except Exception as e:  # reported by every rank below, not left to hang the others
            mine = ("error", f"{type(e).__name__}: {e}")
        everyone = cc.all_gather_objects(mine)
        failed = [f"rank {r}: {v}" for r, (status, v) in enumerate(everyone) if status == "error"]
        if failed:
            raise RuntimeError(f"writing checkpoint {final.name} failed ({'; '.join(failed)}); it stays invisible in {tmp}")
        if cc.rank() == 0:
            entries = {k: v for _, digests in everyone for k, v in digests.items()}
            if self.before_publish is not None:
                self.before_publish()
            entries.update(_digests(tmp, [p for p in _files(tmp) if str(p.relative_to(tmp)) not in entries]))
            _atomic_write(tmp / MANIFEST, json.dumps({"files": dict(sorted(entries.items()))}, indent=1))
            replaced = self.root / f".tmp-replaced-{final.name}"
            if final.exists():  # the same step saved again: hide the old one first, so a crash leaves a good one
                final.rename(replaced)
            tmp.rename(final)
            shutil.rmtree(replaced, ignore_errors=True)
            _fsync(self.root)
            _atomic_write(self.root / LATEST, final.name + "\n")
            _prune(self.root, self.keep_last, final)
        cc.barrier()
        return final


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE).read_text())


def resolve_checkpoint(path: str | Path, verified: bool = True) -> Path:
    """A checkpoint folder, or a run directory / checkpoints folder meaning the checkpoint a resume of
    it takes. verified=False takes the first candidate unhashed: enough to read its config."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such checkpoint or run directory; check the path")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.name == "checkpoints":
        found = next((c for c in candidates(p) if not verified or verify(c) is None), None)
        if found is None:
            raise UserError(f"{p}: no complete checkpoint found; train until one is saved or name a checkpoint folder")
        return found
    return p


def is_hf_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "model_config.json").is_file()


def model_config_of(path: str | Path):
    """The ModelConfig of an HF folder, a cptrain weights/checkpoint folder, or a run directory."""
    from ..model.config import ModelConfig
    from ..model.hf_config import from_hf_config

    p = Path(path)
    if is_hf_folder(p):
        return from_hf_config(json.loads((p / "config.json").read_text()), source=str(p / "config.json"))
    p = resolve_checkpoint(p, verified=False)
    f = p / "model_config.json"
    if not f.is_file():
        raise UserError(f"{p}: neither an HF folder (config.json) nor a cptrain checkpoint (model_config.json); pass one of those")
    return ModelConfig.from_dict(json.loads(f.read_text()), source=str(f))


def load_full_weights(path: str | Path):
    """(ModelConfig, full state dict) from an HF folder, any engine's checkpoint or a weights folder."""
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
