"""Does a training path train like the reference path? Real `cptrain train` runs on the same data,
seed and schedule, compared step by step with a reference run, beside a noise run (the reference's
maths in another micro-batch split, so it differs only in bf16 rounding and reduction order):

  plain            SDPA with a dense document mask, no compile, unfused cross-entropy, micro-batch 8
  plain-2          `plain` in two micro-batches of 4: |plain - plain-2| is the bf16 noise floor
  fast             trainer/configs/gpu_*.yaml's path: varlen flash attention, compiled blocks, fused
                   chunked cross-entropy
  fast-2           `fast` in two micro-batches of 4: the noise floor of the fast path
  fast-fa2         `fast` with FlashAttention-4 switched off (CPTRAIN_FA4=0): torch's FA2
  fast-fp8         `fast` with FP8 block linears (train.fp8=tensorwise); fast-fp8-rowwise likewise
  fast-muon        `fast` with Muon for the matrices (optim.name=muon) at AdamW's LR and decay

    python3 bench/loss_parity.py --data DIR --out OUT_DIR [--steps 300]        # plain, plain-2, fast
    python3 bench/loss_parity.py --data DIR --out OUT_DIR --runs fast,fast-2,fast-fp8,fast-fp8-rowwise,fast-muon \
        --ref fast --noise fast-2 --preset 350M
    python3 bench/loss_parity.py --from-metrics bench/results/2026-12-02-h200-parity --out OUT_DIR \
        --runs fast,fast-2,fast-fp8,fast-muon --ref fast --noise fast-2 --steps 200    # the committed runs again
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PLAIN = ["--model.attention=sdpa", "--train.compile=false", "--train.loss_chunk_tokens=0"]
FAST = ["--model.attention=flash_attn", "--train.compile=true", "--train.loss_chunk_tokens=4096"]
RUNS = {
    "plain": [*PLAIN, "--train.micro_batch_size=8"],
    "plain-2": [*PLAIN, "--train.micro_batch_size=4"],
    "fast": [*FAST, "--train.micro_batch_size=8"],
    "fast-2": [*FAST, "--train.micro_batch_size=4"],
    "fast-fa2": [*FAST, "--train.micro_batch_size=8"],  # with CPTRAIN_FA4=0 (FA4_OFF)
    # min_features 512: at the 125M/350M shapes every block linear but the ends' converts.
    "fast-fp8": [*FAST, "--train.micro_batch_size=8", "--train.fp8=tensorwise", "--train.fp8_min_features=512"],
    "fast-fp8-rowwise": [*FAST, "--train.micro_batch_size=8", "--train.fp8=rowwise", "--train.fp8_min_features=512"],
    "fast-muon": [*FAST, "--train.micro_batch_size=8", "--optim.name=muon"],
}
# With flash-attn-4 installed, `fast` runs FlashAttention-4; `fast-fa2` is the same path on torch's FA2 kernels.
FA4_OFF = {"fast-fa2"}


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
                    *RUNS[name]], check=True, env=env)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def diff(a: dict[int, float], b: dict[int, float], start: int = 1) -> dict:
    steps = [s for s in a if s in b and s >= start]
    d = [abs(a[s] - b[s]) for s in steps]
    return {"max_abs": round(max(d), 4), "mean_abs": round(statistics.mean(d), 4), "steps": len(steps)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="prepared data directory (seq_len 2048)")
    p.add_argument("--from-metrics", type=Path, default=None,
                   help="summarize saved runs instead of training: DIR/NAME.jsonl, each a run's metrics.jsonl")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--preset", default="125M", help="model shape (vocab 4096, the data's tokenizer)")
    p.add_argument("--runs", default="plain,plain-2,fast", help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--ref", default="plain", help="the run every other is compared with")
    p.add_argument("--noise", default="plain-2", help="the run whose distance to --ref is the noise floor")
    args = p.parse_args()
    names = args.runs.split(",")
    if not {args.ref, args.noise} <= set(names) or not set(names) <= set(RUNS):
        p.error(f"--runs must be among {', '.join(RUNS)} and include --ref and --noise")
    if not (args.data or args.from_metrics):
        p.error("--data DIR (to train the runs) or --from-metrics DIR (to summarize saved ones) is needed")
    rows = {}
    for name in names:
        if args.from_metrics:
            rows[name] = [json.loads(line) for line in (args.from_metrics / f"{name}.jsonl").read_text().splitlines()]
            continue
        try:
            rows[name] = train(name, args)
        except subprocess.CalledProcessError as e:  # a failed variant is a result; keep the others
            print(f"{name}: failed ({e})", flush=True)
    curves = {name: curve(r) for name, r in rows.items()}
    late = args.steps * 2 // 3
    summary = {
        "preset": args.preset, "steps": args.steps, "ref": args.ref, "noise": args.noise,
        "loss_at": {name: {s: round(c[s], 4) for s in (1, args.steps // 3, late, args.steps) if s in c} for name, c in curves.items()},
        "val_final": {name: next((v for k, v in reversed(list(r[-1].items())) if k.startswith("val/")), None) for name, r in rows.items()},
        "tokens_per_s_median": {name: round(statistics.median(x["tokens_per_s"] for x in r if "tokens_per_s" in x)) for name, r in rows.items()},
        "vs_ref": {name: diff(c, curves[args.ref]) for name, c in curves.items() if name != args.ref},
        "vs_ref_last_third": {name: diff(c, curves[args.ref], late) for name, c in curves.items() if name != args.ref},
    }
    (args.out / "parity.json").write_text(json.dumps({"summary": summary, "curves": curves}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
