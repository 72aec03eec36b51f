"""Build the long- and short-document JSON lines of a long-context extension run.

    python bench/long_docs.py /work/corpora OUT [--go-mb 6.5] [--python-stdlib DIR]

CORPORA is the folder `get_corpora.sh` extracts (text/austen/, text/en_pythondoc.rst,
text/en_gcide.txt, x/golang-1.19-src/). Writes OUT/long.jsonl and OUT/short.jsonl, one
{"text": ...} per document, and prints the documents and bytes taken from each source.

long.jsonl holds whole real documents, built the way ProLong (Gao et al. 2024, "How to Train
Long-Context Language Models (Effectively)") builds its long data: books whole, and code as
repository-level units rather than single files.
  - each Austen novel whole;
  - each Go package directory (its own .go files, not its subdirectories: in Go a directory is
    a package) as one document, files in sorted order, each preceded by `// file: PATH`
    (PATH under the Go src/ root);
    testdata/ and vendor/ trees and generated files (`// Code generated ... DO NOT EDIT.`)
    are skipped;
  - each top-level Python stdlib package as one document, subpackages included (they are read
    and imported together), each file preceded by `# file: PATH`; and each top-level module of
    at least MIN_LONG_BYTES as a document of its own. Tests, site-packages and generated tables
    (encodings/, pydoc_data/) are skipped. The stdlib read is that of the interpreter running
    this script unless --python-stdlib names another.
Only units of at least MIN_LONG_BYTES are written: shorter ones would fall under the long
domain's --min-doc-tokens 16384 at prepare time anyway. The Go tree is larger than the rest
together, so it is capped: packages are visited in the order of the SHA-256 of their path
(seed-free, the same on every machine, and spread over the whole tree rather than its
alphabetical head), and each is taken if the Go text taken so far stays within --go-mb.

short.jsonl replays ordinary short text: blocks of consecutive paragraphs of the Python docs
(a new block at every section heading, at most SHORT_DOC_BYTES each) and blocks of consecutive
GCIDE entries of the same size. Every k-th block is kept, k chosen so that each source gives
about its --pydoc-mb / --gcide-mb budget.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sysconfig
from pathlib import Path

GO_SRC = "x/golang-1.19-src/usr/share/go-1.19/src"
# 16384 tokens at ~4 bytes per token (SmolLM2's tokenizer gives ~4.0-4.5 on prose and Python,
# ~2.4 on Go): most units below this would fall under the long domain's --min-doc-tokens; one
# rule for all sources, at the cost of a few Go packages of 40-64 KiB that would have passed.
MIN_LONG_BYTES = 64 * 1024
# ~1,000-1,300 tokens: short documents, well inside the model's trained 8,192-token window.
SHORT_DOC_BYTES = 4000
SKIP_GO_DIRS = {"testdata", "vendor"}
SKIP_PY_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                "encodings", "pydoc_data"}
# An rst section title's underline (or overline): one punctuation character repeated.
RST_RULE = re.compile(r"^([=\-~^*+#\"'`:.])\1{2,}\s*$")
# Go's marker of generated code (https://go.dev/s/generatedcode): the ssa rewrite rules, the
# syscall tables and the tzdata blob are megabytes of it, and no one reads them as text.
GO_GENERATED = re.compile(r"^// Code generated .* DO NOT EDIT\.$", re.MULTILINE)
# The few source files that hold U+FFFD literally are tests of broken UTF-8 handling, fixtures
# rather than text, and are left out, as are the paragraphs that hold it (the data of the run in
# docs/long_context.md was built so).
REPLACEMENT_CHAR = "\ufffd"
# A GCIDE headword line: `word \pronunciation\ pos.`, not indented.
GCIDE_HEAD = re.compile(r"^\S[^\\]*\\[^\\]+\\")


def concat_files(files: list[Path], root: Path, comment: str) -> str:
    """One document of several source files, each introduced by its path under root; a file
    holding U+FFFD is left out (see REPLACEMENT_CHAR)."""
    texts = {f: f.read_text(encoding="utf-8") for f in sorted(files)}
    return "\n".join(f"{comment} file: {f.relative_to(root).as_posix()}\n{t}"
                      for f, t in texts.items() if REPLACEMENT_CHAR not in t)


def go_docs(src: Path, cap_bytes: int) -> list[str]:
    """Go package directories as documents: in SHA-256 order of their path, each taken if it
    still fits under cap_bytes."""
    packages: dict[Path, list[Path]] = {}
    for f in src.rglob("*.go"):
        if not SKIP_GO_DIRS & set(f.relative_to(src).parts) \
                and not GO_GENERATED.search(f.read_text(encoding="utf-8")):
            packages.setdefault(f.parent, []).append(f)
    sizes = {d: sum(f.stat().st_size for f in fs) for d, fs in packages.items()}
    order = sorted((d for d in packages if sizes[d] >= MIN_LONG_BYTES),
                   key=lambda d: hashlib.sha256(d.relative_to(src).as_posix().encode()).hexdigest())
    taken, total = [], 0
    for d in order:
        if total + sizes[d] <= cap_bytes:
            taken.append(d)
            total += sizes[d]
    return [concat_files(packages[d], src, "//") for d in sorted(taken)]


def python_docs(stdlib: Path) -> list[str]:
    """Top-level stdlib packages (subpackages included) and big top-level modules as documents."""
    docs = []
    for entry in sorted(stdlib.iterdir()):
        if entry.is_dir() and entry.name not in SKIP_PY_DIRS:
            files = [f for f in entry.rglob("*.py")
                     if not SKIP_PY_DIRS & set(f.relative_to(stdlib).parts)]
            if sum(f.stat().st_size for f in files) >= MIN_LONG_BYTES:
                docs.append(concat_files(files, stdlib, "#"))
        elif entry.suffix == ".py" and entry.stat().st_size >= MIN_LONG_BYTES:
            docs.append(concat_files([entry], stdlib, "#"))
    return docs


def pack_blocks(units: list[str], starts_new: list[bool], max_bytes: int) -> list[str]:
    """Consecutive units joined into blocks of at most max_bytes (a longer unit stays whole);
    a unit flagged in starts_new (a section heading) always opens a new block; a unit holding
    U+FFFD is left out."""
    blocks, cur, size = [], [], 0
    for unit, new in zip(units, starts_new):
        if REPLACEMENT_CHAR in unit:
            continue
        n = len(unit.encode()) + 2
        if cur and (new or size + n > max_bytes):
            blocks.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(unit)
        size += n
    if cur:
        blocks.append("\n\n".join(cur))
    return blocks


def is_rst_heading(paragraph: str) -> bool:
    """A paragraph that opens with a section title: `Title` over a rule, or a rule-title-rule."""
    lines = paragraph.split("\n")
    if RST_RULE.match(lines[0]) and len(lines) > 2:
        lines = lines[1:]
    return len(lines) > 1 and bool(lines[0].strip()) and bool(RST_RULE.match(lines[1])) \
        and len(lines[1].rstrip()) >= len(lines[0].strip())


def pydoc_blocks(text: str) -> list[str]:
    """Paragraph blocks of the concatenated Python docs, a new block at every section heading."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
    return pack_blocks(paragraphs, [is_rst_heading(p) for p in paragraphs], SHORT_DOC_BYTES)


def gcide_blocks(text: str) -> list[str]:
    """Blocks of consecutive dictionary entries; the license preamble before the first is dropped."""
    entries: list[list[str]] = []
    for line in text.split("\n"):
        if GCIDE_HEAD.match(line):
            entries.append([line])
        elif entries:
            entries[-1].append(line)
    units = ["\n".join(e).strip("\n") for e in entries]
    return pack_blocks(units, [False] * len(units), SHORT_DOC_BYTES)


def every_kth(blocks: list[str], budget_bytes: int) -> list[str]:
    """Evenly spaced blocks (every k-th, from the first) up to budget_bytes: a sample of the
    whole source, not of its beginning."""
    total = sum(len(b.encode()) for b in blocks)
    k = max(1, total // budget_bytes)
    kept, size = [], 0
    for b in blocks[::k]:
        if size >= budget_bytes:
            break
        kept.append(b)
        size += len(b.encode())
    return kept


def write_jsonl(path: Path, docs: list[str]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def report(name: str, docs: list[str]) -> None:
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"{name:8s} {len(docs):6d} documents {mb:8.2f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("corpora", type=Path, help="folder get_corpora.sh extracted into")
    p.add_argument("out", type=Path, help="folder to write long.jsonl and short.jsonl into")
    p.add_argument("--go-mb", type=float, default=6.5, help="MB of Go package text to take")
    p.add_argument("--python-stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                   help="Python stdlib source tree (default: this interpreter's)")
    p.add_argument("--pydoc-mb", type=float, default=2.5, help="MB of Python-docs blocks to take")
    p.add_argument("--gcide-mb", type=float, default=1.8, help="MB of GCIDE blocks to take")
    args = p.parse_args()
    text = args.corpora / "text"
    args.out.mkdir(parents=True, exist_ok=True)

    austen = [f.read_text(encoding="utf-8") for f in sorted((text / "austen").glob("*.txt"))]
    go = go_docs(args.corpora / GO_SRC, int(args.go_mb * 1e6))
    python = python_docs(args.python_stdlib)
    for name, docs in (("austen", austen), ("go", go), ("python", python)):
        report(name, docs)
    write_jsonl(args.out / "long.jsonl", austen + go + python)

    pydoc = every_kth(pydoc_blocks((text / "en_pythondoc.rst").read_text(encoding="utf-8")),
                      int(args.pydoc_mb * 1e6))
    gcide = every_kth(gcide_blocks((text / "en_gcide.txt").read_text(encoding="utf-8")),
                      int(args.gcide_mb * 1e6))
    for name, docs in (("pydoc", pydoc), ("gcide", gcide)):
        report(name, docs)
    write_jsonl(args.out / "short.jsonl", pydoc + gcide)


if __name__ == "__main__":
    main()
