"""Dense vs. sparse vs. sparse-then-dense (SPDF) at equal training tokens, on the shipped demo corpus.

    python bench/sparse_vs_dense.py [--out runs/sparse_vs_dense] [--tokens 327680] [--target 0.75] [--seed 0]

Prepares Jane Austen (data_pipeline/demo/austen.txt) with `cptrain data prepare`, then trains the
same small Llama three times with the same data order and LR schedule:
  dense    - no pruning;
  sparse   - gradual magnitude pruning (cubic, Zhu & Gupta) from 10% to 40% of the tokens, to --target;
  spdf     - the same, then densified at 75% of the tokens (Thangarasa et al. 2023).
Prints a markdown table: final validation loss, average non-zero parameters over training (The
Journey Matters' N), final non-zero parameters, wall time and CPU time.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from cptrain.launch.cli import main as cli
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import run

DEMO = Path(__file__).resolve().parent.parent / "data_pipeline" / "demo" / "austen.txt"
MODEL = {"model.preset": "tiny", "model.vocab_size": 2048, "model.dim": 96, "model.n_layers": 4, "model.n_heads": 4,
         "model.n_kv_heads": 2, "model.ffn_dim": 256, "model.max_seq_len": 128}


def prepare(out: Path) -> Path:
    data = out / "data" / "english"
    if not (data / "manifest.json").is_file():
        rc = cli(["data", "prepare", "--input", str(DEMO), "--out", str(data), "--train-tokenizer", "2000",
                  "--seq-len", "128", "--val-fraction", "0.05", "--txt-split", "paragraph"])
        if rc:
            raise SystemExit(rc)
    return data


def variants(tokens: int, target: float) -> dict[str, dict]:
    sparse = {"sparsity.enabled": True, "sparsity.target": target, "sparsity.start_fraction": 0.1,
              "sparsity.end_fraction": 0.4, "sparsity.interval_tokens": tokens // 40}
    return {"dense": {}, "sparse": sparse, "spdf": {**sparse, "sparsity.densify_at_tokens": tokens * 3 // 4}}


def _cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (data workers): unlike wall time,
    it holds on a shared, busy machine."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def train(out: Path, data: Path, name: str, tokens: int, seed: int, extra: dict) -> dict:
    base = {**MODEL, "run_dir": str(out / "runs" / f"{name}-seed{seed}"), "seed": seed, "data.seq_len": 128,
            "data.domains": f"[{{name: english, path: {data}}}]", "train.max_tokens": tokens,
            "train.global_batch_tokens": 4096, "train.micro_batch_size": 16, "train.device": "cpu",
            "schedule.lr": 3e-3, "eval.max_samples": 128, "eval.at_start": False,
            "checkpoint.at_end": False, "log.progress": False}
    cfg = load_config(None, [f"--{k}={v}" for k, v in {**base, **extra}.items()])
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    rows = run(cfg)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    info = json.loads((Path(cfg.run_dir) / "run_info.json").read_text())
    return {"run": name, "seed": seed, "val_loss": rows[-1]["val/english"], "avg_nonzero_params": info["avg_nonzero_params"],
            "final_nonzero_params": info["nonzero_params"], "params": info["params"], "tokens": rows[-1]["tokens"],
            "seconds": seconds, "cpu_seconds": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/sparse_vs_dense", help="data and runs (runs/ is git-ignored)")
    ap.add_argument("--tokens", type=int, default=327680, help="training tokens per run (a multiple of 4096)")
    ap.add_argument("--target", type=float, default=0.75, help="final sparsity of the attention and MLP matrices")
    ap.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    args = ap.parse_args()
    out, tokens = Path(args.out), args.tokens
    data = prepare(out)
    results = [train(out, data, name, tokens, args.seed, extra) for name, extra in variants(tokens, args.target).items()]
    (out / f"results-seed{args.seed}.json").write_text(json.dumps(results, indent=1))
    print(f"\n{tokens:,} tokens per run, target sparsity {args.target} of attention+MLP matrices, seed {args.seed}\n")
    print("| run | final val loss | avg non-zero params | final non-zero params | wall s | CPU s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['val_loss']:.4f} | {r['avg_nonzero_params']:,.0f} ({r['avg_nonzero_params'] / r['params']:.1%}) "
              f"| {r['final_nonzero_params']:,} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} |")


if __name__ == "__main__":
    main()
