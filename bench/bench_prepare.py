"""Throughput of `cptrain data prepare` on real text: tokens/s and tokens/s per process.

    python bench/bench_prepare.py [--input FILE...] [--procs 1 2] [--seq-len 2048] [--vocab 8000]

Defaults to the shipped demo corpus (Austen + Reina-Valera, 2.5 MB). The tokenizer is trained
once beforehand and excluded from the timing; each row is a full, fresh `prepare` (reading,
tokenizing, packing, writing MDS shards, merging, manifest), wall-clock.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipeline import prepare  # noqa: E402
from launch.cli import build_parser  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "data_pipeline" / "demo"


def _args(inputs, out, *extra):
    return build_parser().parse_args(["data", "prepare", "--input", *map(str, inputs), "--out", str(out),
                                      "--txt-split", "paragraph", *map(str, extra)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+", default=[str(DEMO / "austen.txt"), str(DEMO / "rv1909_nt.txt")])
    ap.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--repeat", type=int, default=2, help="runs per row; the best is reported")
    a = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    mb = sum(Path(p).stat().st_size for p in a.input) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        prepare.run(_args(a.input, Path(tmp) / "tok", "--train-tokenizer", a.vocab, "--seq-len", a.seq_len))
        train_s = time.perf_counter() - t0
        model = Path(tmp) / "tok" / "tokenizer.model"
        print(f"input: {mb:.1f} MB of text; sentencepiece BPE {a.vocab} trained in {train_s:.1f} s "
              f"(incl. one prepare); {os.cpu_count()} cores")
        print(f"| procs | tokens | seconds | tokens/s | tokens/s per process |\n|---|---|---|---|---|")
        for procs in a.procs:
            best, tokens = float("inf"), 0
            for r in range(a.repeat):
                out = Path(tmp) / f"p{procs}-{r}"
                t0 = time.perf_counter()
                m = prepare.run(_args(a.input, out, "--tokenizer", model, "--seq-len", a.seq_len,
                                      "--num-proc", procs, "--chunk-mb", mb / (2 * procs)))
                best = min(best, time.perf_counter() - t0)
                tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
                shutil.rmtree(out)
            print(f"| {procs} | {tokens:,} | {best:.2f} | {tokens / best:,.0f} | {tokens / best / procs:,.0f} |")


if __name__ == "__main__":
    main()
