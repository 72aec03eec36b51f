"""`cptrain demo`: the whole pipeline on the shipped corpus, on CPU in a few minutes.

Trains a sentencepiece tokenizer on Jane Austen, writes MDS shards, pretrains a tiny Llama and
shows the loss falling; writes a checkpoint, metrics.jsonl and a loss plot under --out.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from launch.cli import main as cli
from trainer.config import load_config
from trainer.loop import run
from trainer.report import plot_loss

CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def corpus(name: str) -> Path:
    return Path(str(resources.files("data_pipeline") / "demo" / name))


def prepare(out: Path, name: str, text: str, tokenizer: list[str]) -> Path:
    dest = out / "data" / name
    if not (dest / "manifest.json").is_file():
        cli(["data", "prepare", "--input", str(corpus(text)), "--out", str(dest), *tokenizer,
             "--seq-len", "256", "--val-fraction", "0.05", "--txt-split", "paragraph"])
    return dest


def main(args) -> int:
    out = Path(args.out)
    english = prepare(out, "english", "austen.txt", ["--train-tokenizer", "4000"])
    overrides = [f"--run_dir={out / 'runs' / 'pretrain'}", f"--data.domains=[{{name: english, path: {english}}}]"]
    if args.steps:
        overrides.append(f"--train.max_tokens={args.steps * 8192}")
    cfg = load_config(CONFIG, overrides)
    rows = run(cfg)
    losses = [r["loss"] for r in rows if "loss" in r]
    run_dir = Path(cfg.run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plot_loss(metrics, out / "loss.png")
    print(f"\npretraining on {english.name}: first loss {losses[0]:.3f} -> last loss {losses[-1]:.3f} "
          f"over {len(losses)} steps ({rows[-1]['tokens']:,} tokens)")
    print(f"run directory: {run_dir} (checkpoint, metrics.jsonl, config.yaml); loss plot: {out / 'loss.png'}")
    return 0
