"""Throughput of `cptrain data prepare` on real text: tokens/s, and tokens per CPU-second (per core).

    python bench/bench_prepare.py [--input FILE...] [--rows 1x1 1x0 2x1] [--seq-len 2048] [--vocab 8000]

Defaults to the shipped demo corpus (Austen + Reina-Valera, 2.5 MB). The tokenizer is trained
once beforehand and excluded from the timing; each row is a full, fresh `prepare` (reading,
tokenizing, packing, writing MDS shards, merging, manifest), wall-clock.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from cptrain.data_pipeline import prepare
from cptrain.launch.cli import build_parser

DEMO = Path(__file__).resolve().parent.parent / "data_pipeline" / "demo"


def _args(inputs, out, *extra):
    return build_parser().parse_args(["data", "prepare", "--input", *map(str, inputs), "--out", str(out),
                                      "--txt-split", "paragraph", *map(str, extra)])


def _cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (the tokenizer pool): tokens per
    CPU-second is the per-core rate, and unlike wall time it holds on a shared, busy machine."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+", default=[str(DEMO / "austen.txt"), str(DEMO / "rv1909_nt.txt")])
    ap.add_argument("--rows", nargs="+", default=["1x1", "1x0", "2x1"],
                    help="PROCSxTHREADS per row (threads 0: sentencepiece uses all cores)")
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
        print("| processes x threads | tokens | wall s | tokens/s | CPU s | tokens per CPU-second |\n"
              "|---|---|---|---|---|---|")
        for row in a.rows:
            procs, threads = map(int, row.split("x"))
            best, cpu, tokens = float("inf"), float("inf"), 0
            for r in range(a.repeat):
                out = Path(tmp) / f"{row}-{r}"
                t0, c0 = time.perf_counter(), _cpu_seconds()
                m = prepare.run(_args(a.input, out, "--tokenizer", model, "--seq-len", a.seq_len,
                                      "--num-proc", procs, "--tokenizer-threads", threads))
                best, cpu = min(best, time.perf_counter() - t0), min(cpu, _cpu_seconds() - c0)
                tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
                shutil.rmtree(out)
            print(f"| {procs} x {threads or 'all'} | {tokens:,} | {best:.2f} | {tokens / best:,.0f} | "
                  f"{cpu:.2f} | {tokens / cpu:,.0f} |")


if __name__ == "__main__":
    main()
