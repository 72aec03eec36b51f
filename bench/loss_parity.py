"""Does the GPU fast path train like the plain path? Three real `cptrain train` runs on the same
data, seed and schedule, compared step by step:

  plain    SDPA with a dense document mask, no compile, unfused cross-entropy, micro-batch 8
  plain-2  the same maths in two micro-batches of 4 (gradient accumulation): differs from `plain`
           only in bf16 rounding and reduction order, so |plain - plain-2| is the bf16 noise floor
  fast     trainer/configs/gpu_*.yaml's path: varlen flash attention, compiled blocks, fused
           chunked cross-entropy
  fast-fa2 (--fa4-vs-fa2) `fast` with FlashAttention-4 switched off (CPTRAIN_FA4=0): torch's FA2

    python3 bench/loss_parity.py --data DIR --out OUT_DIR [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

RUNS = {
    "plain": ["--model.attention=sdpa", "--train.compile=false", "--train.loss_chunk_tokens=0", "--train.micro_batch_size=8"],
    "plain-2": ["--model.attention=sdpa", "--train.compile=false", "--train.loss_chunk_tokens=0", "--train.micro_batch_size=4"],
    "fast": ["--model.attention=flash_attn", "--train.compile=true", "--train.loss_chunk_tokens=4096", "--train.micro_batch_size=8"],
}
# With flash-attn-4 installed, `fast` runs FlashAttention-4; `fast-fa2` is the same path on torch's FA2 kernels.
FA4_OFF = {"fast-fa2": "fast"}


def train(name: str, args) -> list[dict]:
    run_dir = args.out / name
    common = [f"--run_dir={run_dir}", f"--model.preset={args.preset}", "--model.vocab_size=4096", "--model.max_seq_len=2048",
              "--model.doc_masking=true",
              "--data.seq_len=2048", f"--data.domains=[{{name: english, path: {args.data}}}]",
              f"--train.max_tokens={args.steps * 16384}", "--train.global_batch_tokens=16384", "--train.precision=bf16",
              "--schedule.lr=1e-3", "--schedule.kind=cosine", "--schedule.warmup_fraction=0.05",
              "--eval.max_samples=64", "--checkpoint.at_end=false", "--log.progress=false"]
    env = dict(os.environ, CPTRAIN_FA4="0") if name in FA4_OFF else None
    subprocess.run([sys.executable, "-m", "cptrain.launch.cli", "train", "trainer/configs/gpu_350m.yaml", *common,
                    *RUNS[FA4_OFF.get(name, name)]], check=True, env=env)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def diff(a: dict[int, float], b: dict[int, float], start: int = 1) -> dict:
    steps = [s for s in a if s in b and s >= start]
    d = [abs(a[s] - b[s]) for s in steps]
    return {"max_abs": round(max(d), 4), "mean_abs": round(statistics.mean(d), 4), "steps": len(steps)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="prepared data directory (seq_len 2048)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--preset", default="125M", help="model shape (vocab 4096, the data's tokenizer)")
    p.add_argument("--fa4-vs-fa2", action="store_true", help="also run `fast` on FA2 kernels (flash-attn-4 installed)")
    args = p.parse_args()
    names = [*RUNS, *(FA4_OFF if args.fa4_vs_fa2 else ())]
    rows = {name: train(name, args) for name in names}
    curves = {name: curve(r) for name, r in rows.items()}
    late = args.steps * 2 // 3
    summary = {
        "loss_at": {name: {s: round(c[s], 4) for s in (1, args.steps // 3, late, args.steps) if s in c} for name, c in curves.items()},
        "val_final": {name: next((v for k, v in reversed(list(r[-1].items())) if k.startswith("val/")), None) for name, r in rows.items()},
        "tokens_per_s_median": {name: round(statistics.median(x["tokens_per_s"] for x in r if "tokens_per_s" in x)) for name, r in rows.items()},
        "fast_vs_plain": diff(curves["fast"], curves["plain"]),
        "fast_vs_plain_last_third": diff(curves["fast"], curves["plain"], late),
        "noise_plain2_vs_plain": diff(curves["plain-2"], curves["plain"]),
        "noise_plain2_vs_plain_last_third": diff(curves["plain-2"], curves["plain"], late),
    }
    if "fast-fa2" in curves:
        summary["fast_vs_fast_fa2"] = diff(curves["fast"], curves["fast-fa2"])
        summary["fast_vs_fast_fa2_last_third"] = diff(curves["fast"], curves["fast-fa2"], late)
        summary["fast_fa2_vs_plain_last_third"] = diff(curves["fast-fa2"], curves["plain"], late)
    (args.out / "parity.json").write_text(json.dumps({"summary": summary, "curves": curves}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
