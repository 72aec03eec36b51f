"""Uniform vs. loss-based sample reweighting (Sow et al. 2025) vs. online domain weights, on the demo
corpus mixed 50/50 (Austen English + Reina-Valera Spanish): a tiny Llama, equal tokens per run,
validation loss per domain at the end. Prints a markdown table (docs/reweighting.md).

    python bench/reweighting_experiment.py --out /tmp/rw_exp [--steps 40] [--seeds 0]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cptrain.launch.cli import main as cli
from cptrain.trainer.config import load_config
from cptrain.launch.demo import corpus
from cptrain.trainer.loop import run

SEQ, BATCH_TOKENS = 128, 2048

VARIANTS = {  # name -> overrides
    "uniform": {},
    "linupper": {"reweighting.instance.strategy": "linupper"},
    "quadratic": {"reweighting.instance.strategy": "quadratic"},
    "extremes": {"reweighting.instance.strategy": "extremes"},
    "domain (train loss)": {"reweighting.domain.signal": "train", "reweighting.domain.eta": 1.0,
                            "reweighting.domain.interval_tokens": 4 * BATCH_TOKENS},
}


def prepare(out: Path) -> tuple[Path, Path]:
    en, es = out / "data" / "en", out / "data" / "es"
    common = ["--seq-len", str(SEQ), "--txt-split", "paragraph"]
    if not (en / "manifest.json").is_file():
        cli(["data", "prepare", "--input", str(corpus("austen.txt")), "--out", str(en), "--train-tokenizer", "4000",
             "--val-fraction", "0.05", *common])
    if not (es / "manifest.json").is_file():
        cli(["data", "prepare", "--input", str(corpus("rv1909_nt.txt")), "--out", str(es), "--tokenizer",
             str(en / "tokenizer.model"), "--val-fraction", "0.1", *common])
    return en, es


def one_run(out: Path, en: Path, es: Path, name: str, extra: dict, steps: int, seed: int) -> dict:
    base = {
        "run_dir": str(out / "runs" / f"{name.split()[0]}-{seed}"), "seed": seed,
        "model.preset": "tiny", "model.vocab_size": 4096, "model.max_seq_len": SEQ,
        "data.seq_len": SEQ, "data.domains": f"[{{name: en, path: {en}}}, {{name: es, path: {es}}}]",
        "train.max_tokens": steps * BATCH_TOKENS, "train.global_batch_tokens": BATCH_TOKENS,
        "train.micro_batch_size": 8, "schedule.lr": 3e-3, "eval.max_samples": 64, "eval.at_start": False,
        "checkpoint.at_end": False, "log.progress": False,
        # The paper skips the first 1000 of 20000 steps (5%); here 10% of the run.
        "reweighting.instance.warmup_tokens": steps * BATCH_TOKENS // 10,
    }
    cfg = load_config(None, [f"--{k}={v}" for k, v in {**base, **extra}.items()])
    t0 = time.process_time()  # CPU seconds of this process: the machine is shared, wall time is not ours
    rows = run(cfg)
    seconds = time.process_time() - t0
    last = rows[-1]
    weights = [r for r in rows if "domain_weight/en" in r]
    return {"variant": name, "seed": seed, "val_en": last["val/en"], "val_es": last["val/es"],
            "train_loss": last["loss"], "seconds": seconds,
            "w_en": weights[-1]["domain_weight/en"] if weights else 0.5}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/rw_exp")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    out = Path(args.out)
    en, es = prepare(out)
    results = [one_run(out, en, es, name, extra, args.steps, seed)
               for seed in args.seeds for name, extra in VARIANTS.items()]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{args.steps} steps x {BATCH_TOKENS} tokens, seeds {args.seeds}: mean over seeds")
    print("| variant | val/en | val/es | mean | final w_en | CPU s/run |\n|---|---|---|---|---|---|")
    for name in VARIANTS:
        rs = [r for r in results if r["variant"] == name]
        m = {k: sum(r[k] for r in rs) / len(rs) for k in ("val_en", "val_es", "w_en", "seconds")}
        print(f"| {name} | {m['val_en']:.4f} | {m['val_es']:.4f} | {(m['val_en'] + m['val_es']) / 2:.4f} | "
              f"{m['w_en']:.3f} | {m['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
