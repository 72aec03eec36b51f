"""Where `cptrain data prepare` (and `data merge`) write: a local folder, or an object-store URL.

For a URL the directory is built in a local work folder (`--work-dir`, by default one per URL under
~/.cache/cptrain/prepare, so a rerun finds its markers) and uploaded as it is written: each chunk's
files once the chunk is complete (its shards are then dropped locally, its small index kept for the
merged index), then the tokenizer and the merged indexes, and manifest.json last, so the remote
directory is complete exactly when its manifest exists, as a local one is.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .remote import Uploader, is_url, join, local_path, read_bytes

WORK_ROOT = "~/.cache/cptrain/prepare"


@dataclass
class Output:
    folder: Path                     # the prepared directory on this machine (for a URL: its work folder)
    url: str | None = None           # the store it is uploaded to
    uploader: Uploader | None = None

    @classmethod
    def open(cls, out: str, work_dir: str | None) -> "Output":
        """Check the destination (scheme, bucket, credentials) before any work is done."""
        if not is_url(out):
            if work_dir:
                raise UserError("--work-dir is for an --out URL; a local --out is its own work folder")
            return cls(Path(out).resolve())
        if work_dir:
            folder = local_path(work_dir, "--work-dir").expanduser().resolve()
        else:
            import xxhash
            folder = Path(WORK_ROOT).expanduser() / xxhash.xxh64(out.rstrip("/").encode()).hexdigest()
        fresh = not folder.exists()
        try:
            return cls(folder, out.rstrip("/"), Uploader(folder, out.rstrip("/")))
        except UserError:
            if fresh:  # the uploader made it: a refused destination leaves nothing behind
                shutil.rmtree(folder, ignore_errors=True)
            raise

    @property
    def location(self) -> str:
        return self.url or str(self.folder)

    def published_manifest(self) -> dict | None:
        """The manifest already at the URL (a complete directory), if any."""
        data = read_bytes(join(self.url, "manifest.json"), Path(tempfile.gettempdir())) if self.url else None
        return json.loads(data) if data else None

    def publish_chunk(self, name: str) -> None:
        """Upload a finished chunk's folders, then keep only their index.json locally."""
        if not self.uploader:
            return
        for split in ("train", "val"):
            folder = self.folder / split / name
            files = sorted(folder.iterdir()) if folder.is_dir() else []
            for f in files:
                self.uploader.upload(f"{split}/{name}/{f.name}")
            for f in files:
                if f.name != "index.json":
                    f.unlink()

    def publish_directory(self, manifest: dict) -> None:
        """Upload the tokenizer and the merged indexes, then the manifest (last)."""
        if not self.uploader:
            return
        tokenizer = manifest.get("tokenizer_files") or tokenizer_files(self.folder, manifest["tokenizer"]["file"])
        for rel in tokenizer + ["train/index.json", "val/index.json"]:
            if (self.folder / rel).is_file():
                self.uploader.upload(rel)
        self.uploader.upload("manifest.json")


def tokenizer_files(folder: Path, name: str) -> list[str]:
    """The files of a saved tokenizer (a file or a folder), relative to `folder`."""
    path = folder / name
    return [name] if path.is_file() else sorted(f"{name}/{p.name}" for p in path.iterdir() if p.is_file())
