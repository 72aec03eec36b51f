"""`cptrain data prepare`: local files -> tokenized, packed MDS shards + manifest.json, in a local
folder or uploaded to an object store as they are written (output.py).

Layout written (docs/data.md has the details):
    DIR/manifest.json            written last: its presence means the directory is complete
    DIR/tokenizer.model | DIR/tokenizer/
    DIR/{train,val}/index.json   merged index over the chunk subdirectories
    DIR/{train,val}/chunk-NNNNN/ one MDS folder per input chunk
    DIR/.work/                   plan, per-chunk completion markers, scratch (kept for reruns)

Idempotence: the input is cut into deterministic chunks (consecutive documents, ~--chunk-mb of
text each). A chunk is written into scratch, moved into place, published (uploaded, for a URL
--out), then marked done by an atomic rename of its stats file. A rerun with the same settings skips chunks marked done, redoes any
half-written one, then merges the indexes and writes the manifest.
"""
from __future__ import annotations

import codecs
import glob
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Callable

import numpy as np

from . import lengths
from . import tokenizer as tokenizers
from ..errors import UserError
from .output import Output, tokenizer_files

MANIFEST_VERSION = 1
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
MAX_EXAMPLES = 100  # bad-record locations kept per run (counts are always complete)
TOKENIZE_BATCH = 64


# ---------------------------------------------------------------- reading inputs

def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files, directories (recursive) and globs -> a sorted, de-duplicated list of input files."""
    files: list[Path] = []
    for pat in patterns:
        matches = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        if not matches:
            raise UserError(f"{pat}: no file matches this pattern; check the --input path")
        for m in map(Path, matches):
            if m.is_dir():
                files += sorted(p for p in m.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            elif m.is_file():
                if m.suffix not in SUFFIXES:
                    raise UserError(f"{m}: unsupported file type; use .jsonl, .json, .parquet or .txt")
                files.append(m)
            else:
                raise UserError(f"{m}: no such file or directory; check the --input path")
    files = list(dict.fromkeys(p.resolve() for p in files))
    if not files or all(p.stat().st_size == 0 for p in files):
        raise UserError(f"{' '.join(patterns)}: no input text found (no supported files, or all "
                        "empty); pass .jsonl/.json/.parquet/.txt files, folders or globs")
    return files


@dataclass
class Record:
    text: str | None      # None for a bad record
    where: str            # "file:line N" / "file:record N"
    problem: str | None = None


# A JSON escape such as "\ud83d" with no pair decodes to a lone surrogate, which tokenizers refuse.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _is_utf8(path: Path) -> bool:
    """Whether the whole file is valid UTF-8, read in 16 MB blocks (C-speed; it is read again to tokenize)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _check_text(value, where: str, field_name: str, replaced: bool = False) -> Record:
    """replaced: the file held bytes that are not UTF-8, decoded as U+FFFD, so a record with U+FFFD is
    one of them. In a valid file U+FFFD is a character like any other (web text and code hold it)."""
    if value is None:
        return Record(None, where, f"missing text field '{field_name}'")
    if not isinstance(value, str):
        return Record(None, where, f"text field '{field_name}' is {type(value).__name__}, not a string")
    if replaced and "\ufffd" in value:
        return Record(None, where, "invalid UTF-8")
    if bad := _SURROGATE.search(value):
        return Record(None, where, f"unpaired surrogate \\u{ord(bad.group()):04x} in the text")
    if not value.strip():
        return Record(None, where, "empty document")
    return Record(value, where)


def _load(builder: str, path: Path, **kw):
    import datasets
    datasets.disable_progress_bars()
    return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True, **kw)


def iter_records(path: Path, text_field: str, txt_split: str):
    """Yield a Record per document of one input file, in file order."""
    kind = SUFFIXES[path.suffix]
    replaced = kind in ("jsonl", "text") and not _is_utf8(path)  # then decoded with errors="replace"
    if kind == "jsonl":  # read as lines so a malformed line is reported, not fatal to the file
        for i, row in enumerate(_load("text", path, encoding_errors="replace")):
            where, line = f"{path}:line {i + 1}", row["text"]
            if not line.strip():
                continue  # blank lines separate nothing in jsonl
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Record(None, where, "invalid UTF-8" if replaced and "\ufffd" in line else f"malformed JSON ({e.msg})")
                continue
            yield _check_text(obj.get(text_field) if isinstance(obj, dict) else None, where, text_field, replaced)
    elif kind == "text":
        ds = _load("text", path, sample_by=txt_split, keep_linebreaks=txt_split != "line",
                   encoding_errors="replace")
        unit = "line" if txt_split == "line" else txt_split
        for i, row in enumerate(ds):
            yield _check_text(row["text"], f"{path}:{unit} {i + 1}", "text", replaced)
    else:
        try:
            ds = _load(kind, path)
            for i, row in enumerate(ds):
                yield _check_text(row.get(text_field), f"{path}:record {i + 1}", text_field)
        except Exception as e:  # a file the builder cannot parse at all is one bad record
            if isinstance(e, UserError):
                raise
            yield Record(None, f"{path}:whole file", f"unreadable {kind} file ({type(e).__name__}: {e})")


@dataclass
class BadRecords:
    policy: str
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    def add(self, rec: Record) -> None:
        if self.policy == "fail":
            raise UserError(f"{rec.where}: {rec.problem}; fix the record or pass --on-bad-record skip")
        self.counts[rec.problem] = self.counts.get(rec.problem, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"where": rec.where, "problem": rec.problem})

    def as_dict(self) -> dict:
        return {"total": sum(self.counts.values()), "by_problem": self.counts, "examples": self.examples}


def iter_chunks(files: list[Path], text_field: str, txt_split: str, chunk_chars: int, bad: BadRecords):
    """Group the good documents of all files, in order, into chunks of ~chunk_chars characters."""
    chunk, size = [], 0
    for path in files:
        for rec in iter_records(path, text_field, txt_split):
            if rec.text is None:
                bad.add(rec)
                continue
            chunk.append(rec.text)
            size += len(rec.text)
            if size >= chunk_chars:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


# ---------------------------------------------------------------- tokenizing and packing

_worker_tok = None


def _init_worker(tok_path: str, num_threads: int) -> None:
    global _worker_tok
    _worker_tok = tokenizers.load_tokenizer(tok_path, num_threads)


def _encode(texts: list[str]) -> list[np.ndarray]:
    eos = _worker_tok.eos_id
    return [np.asarray(ids + [eos], dtype=np.uint32) for ids in _worker_tok.encode_batch(texts)]


def pack(docs: list[np.ndarray], seq_len: int):
    """Yield (tokens[seq_len+1], doc_starts) samples from documents laid end to end.

    Sample i covers stream positions [i*S, i*S + S]: consecutive samples share one token, so every
    token after the first is a target exactly once. The tail that does not fill a sample is
    dropped (its size is returned by `packed_sizes` and reported in the manifest).
    """
    if not docs:
        return
    stream = np.concatenate(docs)
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    for i in range((len(stream) - 1) // seq_len):
        lo = i * seq_len
        inside = starts[np.searchsorted(starts, lo, "left"):np.searchsorted(starts, lo + seq_len, "right")] - lo
        doc_starts = np.union1d([0], inside).astype(np.uint32)
        yield stream[lo:lo + seq_len + 1], doc_starts


def packed_sizes(n_tokens: int, seq_len: int) -> tuple[int, int]:
    """(samples, dropped tail tokens) for a split of n_tokens: samples cover samples*S + 1 tokens."""
    samples = max(n_tokens - 1, 0) // seq_len
    return samples, (n_tokens - samples * seq_len - 1 if samples else n_tokens)


def write_split(docs: list[np.ndarray], out: Path, seq_len: int, dtype: str, compression: str | None) -> dict:
    """Pack and write one split of a chunk; its counts and length histograms (lengths.py)."""
    from .streaming_compat import streaming
    n_tokens = int(sum(len(d) for d in docs))
    samples, dropped = packed_sizes(n_tokens, seq_len)
    longest = []
    if samples:
        columns = {"tokens": f"ndarray:{dtype}", "doc_starts": "ndarray:uint32"}
        with streaming.MDSWriter(out=str(out), columns=columns, compression=compression,
                                 hashes=["xxh64"], size_limit=1 << 26, progress_bar=False) as w:
            for tokens, starts in pack(docs, seq_len):
                w.write({"tokens": tokens.astype(dtype), "doc_starts": starts})
                longest.append(lengths.longest_piece(starts, seq_len))
    return {"documents": len(docs), "tokens": n_tokens, "samples": samples, "dropped_tokens": dropped,
            "doc_lengths": lengths.histogram(len(d) for d in docs), "row_longest_doc": lengths.histogram(longest)}


def process_chunk(cid: int, texts: list[str], pool, args, dtype: str, out: Path,
                  publish: Callable[[str], None]) -> dict:
    """Tokenize one chunk, split its documents into train/val, drop those below --min-doc-tokens, write
    and publish both splits, mark it done."""
    batches = [texts[i:i + TOKENIZE_BATCH] for i in range(0, len(texts), TOKENIZE_BATCH)]
    docs = [d for b in (pool.imap(_encode, batches) if pool else map(_encode, batches)) for d in b]
    # Per-chunk seeded draw: deterministic for a given plan, independent of --num-proc; drawn before
    # the length filter, so a document lands in the same split whatever --min-doc-tokens.
    is_val = np.random.default_rng([args.seed, cid]).random(len(docs)) < args.val_fraction
    long = np.array([len(d) >= args.min_doc_tokens for d in docs], dtype=bool)
    name, scratch = f"chunk-{cid:05d}", out / ".work" / f"tmp-chunk-{cid:05d}"
    shutil.rmtree(scratch, ignore_errors=True)
    stats = {}
    for split, mask in (("train", ~is_val), ("val", is_val)):
        shutil.rmtree(out / split / name, ignore_errors=True)
        stats[split] = write_split([d for d, m in zip(docs, mask & long) if m], scratch / split,
                                   args.seq_len, dtype, args.compression)
        short = [len(d) for d, m in zip(docs, mask & ~long) if m]
        stats[split].update(short_documents=len(short), short_tokens=sum(short))
        if stats[split]["samples"]:
            (out / split).mkdir(exist_ok=True)
            os.replace(scratch / split, out / split / name)
    publish(name)
    marker = out / ".work" / "done" / f"{name}.json"
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "stats.json").write_text(json.dumps(stats))
    os.replace(scratch / "stats.json", marker)  # the atomic step that makes the chunk count
    shutil.rmtree(scratch, ignore_errors=True)
    return stats


# ---------------------------------------------------------------- plan, tokenizer, merge, manifest

def _file_entry(p: Path) -> dict:
    st = p.stat()
    return {"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def make_plan(args, files: list[Path], part: tuple[int, int] | None = None) -> dict:
    """Everything that decides the output: a rerun may resume only under an identical plan."""
    if args.tokenizer:
        tok_src = {"path": str(Path(args.tokenizer).resolve()),
                   "identity": tokenizers.load_tokenizer(args.tokenizer).identity()}
    else:
        tok_src = {"train_vocab": args.train_tokenizer, "type": args.tokenizer_type}
    plan = {"version": MANIFEST_VERSION, "inputs": [_file_entry(p) for p in files], "tokenizer": tok_src,
            "seq_len": args.seq_len, "text_field": args.text_field, "txt_split": args.txt_split,
            "val_fraction": args.val_fraction, "seed": args.seed, "chunk_mb": args.chunk_mb,
            "compression": args.compression, "on_bad_record": args.on_bad_record}
    if args.min_doc_tokens:  # only when set: the plans of directories prepared before the option still match
        plan["min_doc_tokens"] = args.min_doc_tokens
    return {**plan, "part": list(part)} if part else plan


def parse_part(text: str | None) -> tuple[int, int] | None:
    """`--part I/N` -> (I, N): this process prepares the chunks c with c mod N = I."""
    if text is None:
        return None
    found = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not found or not int(found[1]) < int(found[2]):
        raise UserError(f"--part {text}: give I/N with 0 <= I < N, e.g. --part 0/8 "
                        "(in a Slurm array: --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(found[1]), int(found[2])


def check_plan(out: Path, plan: dict) -> bool:
    """Record the plan in DIR/.work; True when DIR is already complete under this same plan."""
    work = out / ".work"
    plan_file = work / "plan.json"
    if plan_file.exists():
        if json.loads(plan_file.read_text()) == plan:
            return (out / "manifest.json").exists()
        if (out / "manifest.json").exists():
            raise UserError(f"{out}: holds a preparation with different inputs or settings; "
                            "delete the directory or choose another --out")
        # An unfinished run of ours under other settings (e.g. the input was fixed after
        # --on-bad-record fail): its partial output is useless, start over.
        print(f"{out}: discarding an unfinished preparation made with other settings", file=sys.stderr)
        for name in ("train", "val", "tokenizer", ".work"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "tokenizer.model").unlink(missing_ok=True)
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: directory is not empty and holds no unfinished `data prepare` run "
                        "(no .work/plan.json); choose an empty or new --out")
    (work / "done").mkdir(parents=True, exist_ok=True)
    tmp = work / "plan.json.tmp"
    tmp.write_text(json.dumps(plan, indent=1))
    os.replace(tmp, plan_file)
    return False


def get_tokenizer(args, files: list[Path], out: Path):
    """Load the given tokenizer, or train one on the inputs (once: a rerun reuses it)."""
    if args.tokenizer:
        return tokenizers.load_tokenizer(args.tokenizer)
    model = out / "tokenizer.model"
    if model.exists():
        return tokenizers.SentencePieceTokenizer(model)
    sample, budget = out / ".work" / "tokenizer_train.txt", 200_000_000  # chars sentencepiece sees
    with open(sample, "w", encoding="utf-8") as f:
        for chunk in iter_chunks(files, args.text_field, args.txt_split, 1 << 22, BadRecords("skip")):
            for text in chunk:
                f.write(text.replace("\r", "") + "\n")
            budget -= sum(len(t) for t in chunk)
            if budget <= 0:
                break
    tmp = out / ".work" / "tokenizer.model"
    tokenizers.train_sentencepiece(sample, tmp, args.train_tokenizer, args.tokenizer_type)
    os.replace(tmp, model)  # in place only once complete: a rerun never sees half a model
    sample.unlink()
    return tokenizers.SentencePieceTokenizer(model)


def merge_split(out: Path, split: str, n_chunks: int) -> None:
    """Write DIR/split/index.json over the chunk folders, in chunk order (sample ids follow it)."""
    import logging
    from .streaming_compat import merge_index
    parts = [out / split / f"chunk-{c:05d}" / "index.json" for c in range(n_chunks)]
    parts = [str(p) for p in parts if p.exists()]
    if not parts:
        return
    logging.disable(logging.WARNING)  # merge_index logs a temp-folder warning on the root logger
    try:
        merge_index(parts, str(out / split))
    finally:
        logging.disable(logging.NOTSET)


COUNTS = ("documents", "tokens", "samples", "dropped_tokens", "short_documents", "short_tokens")
HISTOGRAMS = ("doc_lengths", "row_longest_doc")


def sum_stats(done: list[dict]) -> dict:
    """The splits' counts summed and their length histograms added (over chunks, or over parts)."""
    return {split: {**{k: sum(d[split][k] for d in done) for k in COUNTS},
                    **{k: lengths.add(d[split][k] for d in done) for k in HISTOGRAMS}} for split in ("train", "val")}


def format_report(manifest: dict) -> str:
    lines = [f"prepared {manifest['out']}"]
    min_doc = manifest["settings"].get("min_doc_tokens", 0)
    for split, s in manifest["splits"].items():
        short = f"; {s['short_documents']:,} documents under {min_doc:,} tokens dropped" if min_doc else ""
        lines.append(f"  {split}: {s['documents']:,} documents, {s['tokens']:,} tokens, "
                     f"{s['samples']:,} samples of {manifest['seq_len']}+1 "
                     f"({s['dropped_tokens']:,} tail tokens dropped{short})")
        if s["documents"]:
            lines.append(f"    documents by tokens: {lengths.describe(s['doc_lengths'])}")
            lines.append(f"    rows by longest document: {lengths.describe(s['row_longest_doc'])}")
    bad = manifest["bad_records"]
    lines.append(f"  bad records skipped: {bad['total']:,}")
    for problem, n in sorted(bad["by_problem"].items(), key=lambda kv: -kv[1]):
        where = [e["where"] for e in bad["examples"] if e["problem"] == problem][:3]
        lines.append(f"    {n:,} x {problem}: e.g. {', '.join(where)}")
    if len(bad["examples"]) < bad["total"]:
        lines.append(f"    (first {len(bad['examples'])} locations listed in manifest.json)")
    return "\n".join(lines)


def process_all(args, files: list[Path], out: Path, tok_path: Path, dtype: str, bad: BadRecords,
                publish: Callable[[str], None], part: tuple[int, int] | None = None) -> tuple[dict[int, dict], int]:
    """Every chunk in order: skipped when marked done, else tokenized, written and published
    (uploaded, for a URL --out); with --part I/N only the chunks c with c mod N = I, the others
    only read (the chunk boundaries depend on every document before them). Returns the stats of
    this process's chunks by chunk number, and the number of chunks in the input."""
    # Default threads: all cores in one process, one per process when there are several.
    threads = args.tokenizer_threads or (-1 if args.num_proc == 1 else 1)
    pool = Pool(args.num_proc, _init_worker, (str(tok_path), threads)) if args.num_proc > 1 else None
    if pool is None:
        _init_worker(str(tok_path), threads)
    from tqdm import tqdm
    bar = tqdm(desc="prepare", unit="chunk", disable=None, file=sys.stderr)
    done, total = {}, 0
    try:
        chunks = iter_chunks(files, args.text_field, args.txt_split, int(args.chunk_mb * 1e6), bad)
        for cid, texts in enumerate(chunks):
            total = cid + 1
            if part and cid % part[1] != part[0]:
                continue
            marker = out / ".work" / "done" / f"chunk-{cid:05d}.json"
            stats = json.loads(marker.read_text()) if marker.exists() else {}
            if "doc_lengths" in stats.get("train", {}):  # a marker without histograms: done before they existed
                done[cid] = stats
            else:
                done[cid] = process_chunk(cid, texts, pool, args, dtype, out, publish)
            bar.update(1)
            bar.set_postfix(tokens=f"{sum(d['train']['tokens'] + d['val']['tokens'] for d in done.values()):,}")
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return done, total


def check_totals(args, files: list[Path], done: list[dict], bad: BadRecords) -> dict:
    """Summed chunk stats; a UserError when nothing trainable came out, a warning when no validation did."""
    if not done:
        raise UserError(f"{' '.join(args.input)}: no usable document (all {bad.as_dict()['total']} "
                        "records were bad); see the problems above and fix the input")
    totals = sum_stats(done)
    if not totals["train"]["samples"]:
        fix = (f"a lower --min-doc-tokens (it dropped {totals['train']['short_documents']} documents), "
               if args.min_doc_tokens else "")
        raise UserError(f"{' '.join(args.input)}: {totals['train']['tokens']} training tokens cannot fill one "
                        f"sample of {args.seq_len}+1 tokens; use a smaller --seq-len, {fix}or more text")
    if args.val_fraction > 0 and not totals["val"]["samples"]:
        docs = totals["train"]["documents"] + totals["val"]["documents"]
        fix = ("read .txt inputs as paragraphs or lines with --txt-split paragraph|line"
               if any(f.suffix == ".txt" for f in files) and args.txt_split == "document" else "give more documents")
        print(f"warning: --val-fraction {args.val_fraction} left no validation sample ({docs} document{'s' * (docs != 1)} "
              f"in all); training evaluates nothing - {fix}", file=sys.stderr)
    return totals


def write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / "manifest.json")


def _already_done(out: Output, plan: dict) -> dict | None:
    """The manifest when `out` is complete under this plan (finishing an interrupted upload);
    None when there is work to do. Refuses a URL that holds another prepared directory."""
    published = out.published_manifest()
    if not check_plan(out.folder, plan):
        if published:
            raise UserError(f"{out.url}: already holds a prepared directory (manifest.json) with other inputs or "
                            f"settings, or not prepared from {out.folder}; choose another --out or delete it")
        return None
    manifest = json.loads((out.folder / "manifest.json").read_text())
    if out.url and not published:
        out.publish_directory(manifest)
    print(f"{out.location}: already prepared with these settings; nothing to do", file=sys.stderr)
    return manifest


def run(args) -> dict:
    """The whole preparation (or its part `--part I/N`); returns the manifest (also written to
    DIR/manifest.json)."""
    if args.seq_len < 1 or not 0 <= args.val_fraction < 1 or args.chunk_mb <= 0 or args.min_doc_tokens < 0:
        raise UserError("--seq-len must be >= 1, --val-fraction in [0, 1), --chunk-mb > 0, --min-doc-tokens >= 0")
    part = parse_part(args.part)
    if part and not args.tokenizer:
        raise UserError("--part needs --tokenizer: every part must use the same tokenizer file; train one first "
                        "(a prepare without --part, or any sentencepiece model) and pass it to each part")
    files = expand_inputs(args.input)
    from .streaming_compat import streaming  # noqa: F401  (it writes the shards: if missing, say so before any work)
    out = Output.open(args.out, args.work_dir)  # a URL's bucket and credentials are checked here
    folder = out.folder
    folder.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args, files, part)
    manifest = _already_done(out, plan)
    if manifest:
        return manifest
    t0 = time.time()
    tok = get_tokenizer(args, files, folder)
    tok_file = tok.save_to(folder)
    dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
    bad = BadRecords(args.on_bad_record)
    done, total = process_all(args, files, folder, folder / tok_file, dtype, bad, out.publish_chunk, part)
    # A part may hold little or nothing: `data merge` checks the whole.
    totals = sum_stats(list(done.values())) if part else check_totals(args, files, list(done.values()), bad)
    for split in ("train", "val"):
        merge_split(folder, split, total)
    manifest = {
        "version": MANIFEST_VERSION, "out": out.location, "seq_len": args.seq_len, "dtype": dtype,
        "columns": {"tokens": f"ndarray:{dtype}", "doc_starts": "ndarray:uint32"},
        "tokenizer": {**tok.identity(), "file": tok_file}, "tokenizer_files": tokenizer_files(folder, tok_file),
        "splits": totals, "chunks": total, "inputs": plan["inputs"], "bad_records": bad.as_dict(),
        "settings": {**{k: plan[k] for k in ("text_field", "txt_split", "val_fraction", "seed",
                                             "chunk_mb", "compression", "on_bad_record")},
                     "min_doc_tokens": args.min_doc_tokens},
        "seconds": round(time.time() - t0, 2),
    }
    if part:
        manifest["part"] = {"index": part[0], "count": part[1], "chunks": sorted(done)}
    write_manifest(folder, manifest)
    out.publish_directory(manifest)  # the manifest last: a remote directory is complete once it exists
    return manifest


def main(args) -> int:
    manifest = run(args)
    print(format_report(manifest))
    return 0
