"""One split of prepared MDS shards (`DIR/train` or `DIR/val`): its index, its files, random access.

Samples are read by mosaicml-streaming's own shard reader (`MDSReader`, built from each index
entry by `reader_from_json`) and zstd shards are expanded by its `decompress`; `StreamingDataset`
is not used. So nothing here touches shared memory, barriers across ranks or any name two jobs on
one machine could both pick: any number of runs and evaluations read the same folder at once
(docs/data.md says why). A split holds no open file or mapping (each read opens its shard),
so forked DataLoader workers inherit it as is.

`_local_file` is the one place that turns a shard of the index into a file on this machine. A
split in an object store (a URL) has its index read from there and its shards fetched into the
node cache (cache.py: one download per node under a file lock, published by an atomic rename,
least recently used shards evicted above a size limit); a shard deleted by another process's
eviction after this one fetched it is fetched again.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np

from ..errors import UserError
from .cache import NodeCache
from .remote import is_url, join, parent, read_bytes


class ShardSplit:
    """Random access to the samples of one split folder (a path, or a URL read through `cache`),
    with lazy per-shard checks: every shard's xxh64 is compared with index.json the first time
    this process reads it (`verify`)."""

    def __init__(self, root: str | Path, verify: bool = True, cache: NodeCache | None = None):
        from .streaming_compat import reader_from_json
        self.root, self.verify, self.cache = str(root), verify, cache
        self.remote = is_url(self.root)
        if self.remote and cache is None:
            raise ValueError(f"{self.root}: a split in an object store needs a NodeCache")
        index = self._read_index()
        self.shards = json.loads(index)["shards"]
        self.local = cache.folder(self.root, index) if self.remote else Path(self.root)  # where shard files are
        self.readers = [reader_from_json(str(self.local), None, s) for s in self.shards]
        for reader in self.readers:
            try:  # no pickle columns, whose decoding would run code from the data (StreamingDataset's default)
                reader.validate(allow_unsafe_types=False)
            except ValueError as e:
                raise UserError(f"{join(self.root, 'index.json')}: {e}; prepare the data with `cptrain data prepare`") from e
        self.bounds = np.cumsum([0] + [s["samples"] for s in self.shards])  # first sample of each shard
        self.num_samples = int(self.bounds[-1])
        self._ready: set[int] = set()  # shards checked and present as raw files in this process

    def _read_index(self) -> bytes:
        where = join(self.root, "index.json")
        data = read_bytes(where, self.cache.root if self.remote else None)
        if data is None:
            raise UserError(f"{where}: missing; the prepare run did not finish - re-run `cptrain data prepare`")
        return data

    def _damaged(self, where: str | Path, why: str) -> UserError:
        return UserError(f"{where}: {why}; re-run `cptrain data prepare` for {parent(self.root)}")

    def _file_of(self, shard: dict) -> tuple[Path, dict]:
        """The shard file on disk with its index entry (raw if present, else the compressed one)."""
        for key in ("raw_data", "zip_data"):
            info = shard.get(key)
            if info and (self.local / info["basename"]).exists():
                return self.local / info["basename"], info
        raise self._damaged(self.local / shard["raw_data"]["basename"], "shard missing")

    def check_files(self) -> None:
        """Local: every shard present with the size index.json records (cheap: no reading).
        Remote: the cache limit holds the largest shard (the files are checked when fetched)."""
        if self.remote:
            largest = max(s["raw_data"]["bytes"] for s in self.shards)
            if 0 < self.cache.limit_bytes < largest:
                raise UserError(f"data.cache_limit_gb={self.cache.limit_bytes / 1e9:g} is below the size of one shard "
                                f"of {self.root} ({largest / 1e9:g} GB); raise it (or 0: no limit)")
            return
        for shard in self.shards:
            path, info = self._file_of(shard)
            if path.stat().st_size != info["bytes"]:
                raise self._damaged(path, f"shard is {path.stat().st_size} bytes, index.json says {info['bytes']}; "
                                          "the data is damaged")

    def _checked(self, data: bytes, info: dict, where: str | Path) -> bytes:
        import xxhash
        expected = info.get("hashes", {}).get("xxh64")
        if len(data) != info["bytes"] or (self.verify and expected and xxhash.xxh64(data).hexdigest() != expected):
            raise self._damaged(where, "shard is corrupt (xxh64 differs from index.json)")
        return data

    def _expanded(self, shard: dict, data: bytes) -> bytes:
        from .streaming_compat import decompress
        return decompress(shard["compression"], data)

    def _local_file(self, shard_id: int) -> Path:
        """The shard's raw file on this machine, checked, expanded from its compressed form first
        if only that exists. Concurrent processes may expand the same shard: each writes its own
        temporary file and renames it into place, so readers only ever see a whole file."""
        if self.remote:
            return self._cached_file(shard_id)
        shard = self.shards[shard_id]
        path, info = self._file_of(shard)
        if info is shard["raw_data"]:
            if self.verify:
                self._checked(path.read_bytes(), info, path)
            return path
        raw = self.local / shard["raw_data"]["basename"]
        data = self._expanded(shard, self._checked(path.read_bytes(), info, path))
        tmp = raw.with_name(f".{raw.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "xb") as f:  # created with the umask's permissions, like the other shard files
                f.write(data)
            os.replace(tmp, raw)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"{raw.parent}: cannot write the expanded shard {raw.name} ({e.strerror}); make the "
                            "folder writable or prepare the data without --compression") from e
        return raw

    def _cached_file(self, shard_id: int) -> Path:
        """The shard of an object-store split in the node cache: downloaded (the compressed file if
        the split has one), checked and expanded by one process of this node."""
        shard = self.shards[shard_id]
        raw_info = shard["raw_data"]
        stored = shard.get("zip_data") or raw_info  # what `data prepare` uploaded
        dest, url = self.local / raw_info["basename"], join(self.root, stored["basename"])

        def make(tmp: Path) -> None:
            from .remote import download
            download(url, tmp)
            data = self._checked(tmp.read_bytes(), stored, url)
            if stored is not raw_info:
                tmp.write_bytes(self._expanded(shard, data))

        for _ in range(2):
            if self.cache.fetch(dest, make) or not self.verify:
                return dest
            try:  # a copy another process made: check it once in this process, like a local shard
                self._checked(dest.read_bytes(), raw_info, dest)
                return dest
            except (UserError, FileNotFoundError):  # damaged on this disk, or evicted meanwhile
                dest.unlink(missing_ok=True)
        raise self._damaged(dest, "shard is corrupt after a fresh download")

    def get(self, idx: int) -> dict:
        """Sample `idx` of the split as {column: value}."""
        shard_id = int(np.searchsorted(self.bounds, idx, side="right")) - 1
        for attempt in range(2):
            if shard_id not in self._ready:
                self._local_file(shard_id)
                self._ready.add(shard_id)
            elif self.remote:
                self.cache.mark_used(self.local / self.shards[shard_id]["raw_data"]["basename"])
            try:
                return self.readers[shard_id].get_item(idx - int(self.bounds[shard_id]))
            except FileNotFoundError:
                if not self.remote or attempt:
                    raise
                self._ready.discard(shard_id)  # evicted by another process of this node: fetch it again
