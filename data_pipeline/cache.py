"""The node cache of data fetched from object storage (`data.cache_dir`, one per machine).

Each file is made once per node: the processes that need it (ranks, DataLoader workers, other
jobs) take a file lock beside it; the first makes it under a name of its own and renames it into
place, the others find it there when the lock is theirs. Readers therefore only ever see whole
files. Above `data.cache_limit_gb` the shards used least recently (modification time, set on every
read) are deleted, never the one the evicting process is about to read; a process whose shard was
deleted by another one fetches it again (shards.py). Locks are files (`filelock`), so nothing here
uses shared memory or process-wide names, and a killed process leaves nothing held.
"""
from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError

DEFAULT_DIR = "~/.cache/cptrain/data"


@dataclass
class NodeCache:
    root: Path
    limit_bytes: int = 0  # evict shards above this many bytes (0: keep everything)

    @classmethod
    def open(cls, folder: str, limit_gb: float, what: str = "data.cache_dir") -> "NodeCache":
        from .remote import local_path
        root = local_path(folder, what).expanduser()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{what}: cannot create {root} ({e.strerror}); set it to a writable local folder") from e
        if limit_gb < 0:
            raise UserError(f"data.cache_limit_gb={limit_gb} must be >= 0 (0: no limit)")
        return cls(root, int(limit_gb * 1e9))

    def folder(self, url: str, identity: bytes) -> Path:
        """Where the files under `url` go: one folder per URL and content (`identity`, e.g. the
        bytes of its index), so a store prepared again under the same URL gets a fresh folder."""
        import xxhash
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[-60:]
        digest = xxhash.xxh64(url.encode() + b"\0" + identity).hexdigest()
        return self.root / f"{slug}-{digest}"

    def fetch(self, dest: Path, make: Callable[[Path], None]) -> bool:
        """Ensure `dest` exists, made by `make(tmp)` (which writes the file tmp) once per node, and
        mark it used. True when this call made it."""
        if self.mark_used(dest):
            return False
        from filelock import FileLock
        dest.parent.mkdir(parents=True, exist_ok=True)
        made = False
        with FileLock(dest.with_name(f".{dest.name}.lock")):
            if not dest.exists():
                tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
                try:
                    make(tmp)
                    os.replace(tmp, dest)
                finally:
                    tmp.unlink(missing_ok=True)
                made = True
        if made and self.limit_bytes:
            self.evict(keep=dest)
        return made

    @staticmethod
    def mark_used(path: Path) -> bool:
        """Set the file's modification time to now (its place in the LRU order); False if absent."""
        try:
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    def evict(self, keep: Path) -> None:
        """Delete the least recently used shards until the cache holds at most limit_bytes."""
        from filelock import FileLock
        with FileLock(self.root / ".evict.lock"):
            shards = []
            for p in self.root.rglob("*.mds"):  # whole shards only: temporary names end otherwise
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                shards.append((st.st_mtime_ns, st.st_size, p))
            total = sum(size for _, size, _ in shards)
            for _, size, p in sorted(shards):
                if total <= self.limit_bytes:
                    break
                if p != keep:
                    p.unlink(missing_ok=True)
                    total -= size
