"""`cptrain data merge PARTS... --out DIR`: the directories written by `data prepare --part I/N`
(all N of them) joined into one prepared directory.

Every part cuts the input into the same chunks (the cut depends only on the documents and
--chunk-mb), and part I tokenizes and writes the chunks c with c mod N = I under their own numbers.
Merging places each chunk folder at its number (a hard link per file where the filesystem allows,
else a copy), merges each split's index over the chunks in chunk order with streaming's
`merge_index`, takes the tokenizer of part 0, and writes a manifest whose counts are the parts'
sums. The result is, file for file, what one `data prepare` of the same inputs and options writes
(chunk folders, shards, indexes, tokenizer): the same samples in the same order. Only the
manifest's `out`, `seconds` and `merged_from` differ.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..errors import UserError
from .output import Output, tokenizer_files
from .prepare import format_report, merge_split, sum_stats, write_manifest

# Manifest keys every part of one preparation shares (the tokenizer and seq_len have their own messages).
SHARED = ("version", "dtype", "columns", "tokenizer_files", "chunks", "inputs", "bad_records", "settings")


def read_parts(parts: list[str]) -> list[tuple[Path, dict]]:
    """(folder, manifest) of every part, in part order; a UserError unless they are the N parts of
    one preparation."""
    found = []
    for p in parts:
        manifest = Path(p) / "manifest.json"
        if not manifest.is_file():
            raise UserError(f"{manifest}: missing; {p} is not a finished `data prepare --part` directory - rerun that part")
        m = json.loads(manifest.read_text())
        if "part" not in m:
            raise UserError(f"{p}: prepared without --part; merge joins the directories of `data prepare --part I/N`")
        if "doc_lengths" not in m["splits"]["train"]:
            raise UserError(f"{p}: prepared by an older cptrain (no length histograms in its manifest); prepare the "
                            "parts again with this one")
        found.append((Path(p), m))
    found.sort(key=lambda fm: fm[1]["part"]["index"])
    (first_dir, first), n = found[0], found[0][1]["part"]["count"]
    indexes = [m["part"]["index"] for _, m in found]
    if any(m["part"]["count"] != n for _, m in found) or indexes != list(range(n)):
        missing = sorted(set(range(n)) - set(indexes))
        raise UserError(f"data merge: got parts {indexes} of {n} (missing {missing}, or one given twice, or parts of "
                        "different splits); pass the N directories of one `data prepare --part I/N` run, once each")
    for folder, m in found[1:]:
        if m["tokenizer"]["sha256"] != first["tokenizer"]["sha256"]:
            raise UserError(f"{folder}: prepared with another tokenizer than {first_dir}; prepare every part with "
                            "the same --tokenizer")
        if m["seq_len"] != first["seq_len"]:
            raise UserError(f"{folder}: seq_len {m['seq_len']}, but {first_dir} has {first['seq_len']}; prepare "
                            "every part with the same --seq-len")
        differ = [k for k in SHARED if m.get(k) != first.get(k)]
        if differ:
            raise UserError(f"{folder}: {', '.join(differ)} differ from {first_dir}'s; the parts come from different "
                            "preparations - prepare every part with the same inputs and options")
    chunks = sorted(c for _, m in found for c in m["part"]["chunks"])
    if chunks != list(range(first["chunks"])):
        raise UserError(f"data merge: the parts hold chunks {chunks}, not 0..{first['chunks'] - 1}; rerun the parts")
    return found


def _place(src: Path, dst: Path) -> None:
    """dst as a hard link to src (no copy), or a copy where the filesystem cannot link."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _place_chunk(src: Path, dst: Path) -> None:
    """A chunk folder's index and the shard files `data prepare` wrote (compressed ones stay
    compressed; a raw copy a reader expanded beside them is left out)."""
    if not (src / "index.json").is_file():
        return  # this chunk put no sample in this split
    for shard in json.loads((src / "index.json").read_text())["shards"]:
        name = (shard.get("zip_data") or shard["raw_data"])["basename"]
        _place(src / name, dst / name)
    _place(src / "index.json", dst / "index.json")


def _claim(out: Output, parts: list[str]) -> None:
    """Make `out` ready to receive the merge: new or empty, or an unfinished merge (redone)."""
    folder, marker = out.folder, out.folder / ".work" / "merge.json"
    if (folder / "manifest.json").exists() or out.published_manifest():
        raise UserError(f"{out.location}: already holds a prepared directory; choose another --out or delete it")
    if folder.exists() and any(folder.iterdir()) and not marker.exists():
        raise UserError(f"{folder}: directory is not empty and holds no unfinished merge; choose an empty or new --out")
    for name in ("train", "val", "tokenizer"):
        shutil.rmtree(folder / name, ignore_errors=True)
    (folder / "tokenizer.model").unlink(missing_ok=True)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(parts))


def run(parts: list[str], out_location: str, work_dir: str | None = None) -> dict:
    """Merge the part directories into `out_location`; returns the manifest (also written there)."""
    t0 = time.time()
    found = read_parts(parts)
    first_dir, first = found[0]
    totals = sum_stats([m["splits"] for _, m in found])
    if not totals["train"]["samples"]:
        raise UserError("data merge: the parts hold no training sample; prepare more text or a smaller --seq-len")
    out = Output.open(out_location, work_dir)
    _claim(out, parts)
    for folder, m in found:
        for cid in m["part"]["chunks"]:
            name = f"chunk-{cid:05d}"
            for split in ("train", "val"):
                _place_chunk(folder / split / name, out.folder / split / name)
            out.publish_chunk(name)
    for rel in first.get("tokenizer_files") or tokenizer_files(first_dir, first["tokenizer"]["file"]):
        _place(first_dir / rel, out.folder / rel)
    for split in ("train", "val"):
        merge_split(out.folder, split, first["chunks"])
    manifest = {**{k: v for k, v in first.items() if k != "part"}, "out": out.location, "splits": totals,
                "seconds": round(time.time() - t0, 2), "merged_from": [str(f.resolve()) for f, _ in found]}
    write_manifest(out.folder, manifest)
    out.publish_directory(manifest)  # the manifest last: a remote directory is complete once it exists
    return manifest


def main(args) -> int:
    print(format_report(run(args.parts, args.out, args.work_dir)))
    return 0
