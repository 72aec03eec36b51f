"""One split of prepared MDS shards (`DIR/train` or `DIR/val`): its index, its files, random access.

Samples are read by mosaicml-streaming's own shard reader (`MDSReader`, built from each index
entry by `reader_from_json`) and zstd shards are expanded by its `decompress`; `StreamingDataset`
is not used. So nothing here touches shared memory, barriers across ranks or any name two jobs on
one machine could both pick: any number of runs and evaluations read the same folder at once
(docs/data.md says why). A split holds no open file or mapping (each read opens its shard),
so forked DataLoader workers inherit it as is.

`_local_file` is the one place that turns a shard of the index into a file on this machine. Shards
in an object store would be fetched there: downloaded once per node into a cache folder under a
file lock, published by the same atomic rename that publishes a decompressed shard.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np

from ..errors import UserError


class ShardSplit:
    """Random access to the samples of one split folder, with lazy per-shard checks: every
    shard's xxh64 is compared with index.json the first time this process reads it (`verify`)."""

    def __init__(self, root: Path, verify: bool = True):
        from .streaming_compat import reader_from_json
        self.root, self.verify = Path(root), verify
        index = self.root / "index.json"
        if not index.exists():
            raise UserError(f"{index}: missing; the prepare run did not finish - re-run `cptrain data prepare`")
        self.shards = json.loads(index.read_text())["shards"]
        self.readers = [reader_from_json(str(self.root), None, s) for s in self.shards]
        for reader in self.readers:
            try:  # no pickle columns, whose decoding would run code from the data (StreamingDataset's default)
                reader.validate(allow_unsafe_types=False)
            except ValueError as e:
                raise UserError(f"{index}: {e}; prepare the data with `cptrain data prepare`") from e
        self.bounds = np.cumsum([0] + [s["samples"] for s in self.shards])  # first sample of each shard
        self.num_samples = int(self.bounds[-1])
        self._ready: set[int] = set()  # shards checked and present as raw files in this process

    def _damaged(self, path: Path, why: str) -> UserError:
        return UserError(f"{path}: {why}; re-run `cptrain data prepare` for {self.root.parent}")

    def _file_of(self, shard: dict) -> tuple[Path, dict]:
        """The shard file on disk with its index entry (raw if present, else the compressed one)."""
        for key in ("raw_data", "zip_data"):
            info = shard.get(key)
            if info and (self.root / info["basename"]).exists():
                return self.root / info["basename"], info
        raise self._damaged(self.root / shard["raw_data"]["basename"], "shard missing")

    def check_files(self) -> None:
        """Every shard present with the size index.json records (cheap: no reading)."""
        for shard in self.shards:
            path, info = self._file_of(shard)
            if path.stat().st_size != info["bytes"]:
                raise self._damaged(path, f"shard is {path.stat().st_size} bytes, index.json says {info['bytes']}; "
                                          "the data is damaged")

    def _checked_bytes(self, path: Path, info: dict) -> bytes:
        import xxhash
        data = path.read_bytes()
        expected = info.get("hashes", {}).get("xxh64")
        if self.verify and expected and xxhash.xxh64(data).hexdigest() != expected:
            raise self._damaged(path, "shard is corrupt (xxh64 differs from index.json)")
        return data

    def _local_file(self, shard_id: int) -> Path:
        """The shard's raw file on this machine, checked, expanded from its compressed form first
        if only that exists. Concurrent processes may expand the same shard: each writes its own
        temporary file and renames it into place, so readers only ever see a whole file."""
        from .streaming_compat import decompress
        shard = self.shards[shard_id]
        path, info = self._file_of(shard)
        if info is shard["raw_data"]:
            if self.verify:
                self._checked_bytes(path, info)
            return path
        raw = self.root / shard["raw_data"]["basename"]
        data = decompress(shard["compression"], self._checked_bytes(path, info))
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

    def get(self, idx: int) -> dict:
        """Sample `idx` of the split as {column: value}."""
        shard_id = int(np.searchsorted(self.bounds, idx, side="right")) - 1
        if shard_id not in self._ready:
            self._local_file(shard_id)
            self._ready.add(shard_id)
        return self.readers[shard_id].get_item(idx - int(self.bounds[shard_id]))
