"""`cptrain demo`: the whole pipeline on the shipped corpus, on CPU in a few minutes.

Trains a sentencepiece tokenizer on Jane Austen, writes MDS shards, pretrains a tiny Llama and
shows the loss falling; writes a checkpoint, metrics.jsonl and a loss plot under --out. Then
continues it on Spanish (the shifted domain, English tokenizer) with a rewarm and 10% English
replay, and prints the forgetting report (trainer/configs/demo_continual.yaml, trainer/continual.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

from ..data_pipeline.tasks import word_order_items, write_task
from ..errors import UserError
from ..trainer.config import load_config
from ..trainer.loop import run
from ..trainer.analysis.report import plot_loss

CONFIGS = Path(str(resources.files("cptrain.trainer") / "configs"))
CONFIG, CONTINUAL_CONFIG = CONFIGS / "demo.yaml", CONFIGS / "demo_continual.yaml"


def corpus(name: str) -> Path:
    return Path(str(resources.files("cptrain.data_pipeline") / "demo" / name))


def prepare(out: Path, name: str, text: str, tokenizer: list[str]) -> Path:
    dest = out / "data" / name
    if not (dest / "manifest.json").is_file():
        # The command line a user runs, in a process of its own (the CLI dispatches to this module, so
        # importing it back here would close an import circle).
        rc = subprocess.run([sys.executable, "-m", "cptrain.launch.cli", "data", "prepare", "--input", str(corpus(text)),
                             "--out", str(dest), *tokenizer, "--seq-len", "256", "--val-fraction", "0.05",
                             "--txt-split", "paragraph"]).returncode
        if rc:
            raise UserError(f"cptrain data prepare of the demo's {text} into {dest} failed (exit {rc}); see its message above")
    return dest


def main(args) -> int:
    out = Path(args.out)
    english = prepare(out, "english", "austen.txt", ["--train-tokenizer", "4000"])
    overrides = [f"--run_dir={out / 'runs' / 'pretrain'}", f"--data.domains=[{{name: english, path: {english}}}]"]
    if args.steps:
        overrides.append(f"--train.max_tokens={args.steps * 8192}")
    cfg = load_config(CONFIG, overrides)
    rows = run(cfg, overwrite=True)  # a second demo moves the first one's runs aside
    losses = [r["loss"] for r in rows if "loss" in r]
    run_dir = Path(cfg.run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plot_loss(metrics, out / "loss.png")
    print(f"\npretraining on {english.name}: first loss {losses[0]:.3f} -> last loss {losses[-1]:.3f} "
          f"over {len(losses)} steps ({rows[-1]['tokens']:,} tokens)")
    print(f"run directory: {run_dir} (checkpoint, metrics.jsonl, config.yaml); loss plot: {out / 'loss.png'}")
    continue_on_spanish(out, english, run_dir, args.continual_steps)
    return 0


def word_order_tasks(out: Path) -> str:
    """Multiple-choice word-order tasks from the shipped texts (data_pipeline/tasks.py), as an
    `eval.tasks` override: English is the old language, Spanish the new one."""
    tasks = []
    for name, text, role in (("english_order", "austen.txt", "old"), ("spanish_order", "rv1909_nt.txt", "new")):
        path = write_task(word_order_items(corpus(text).read_text(encoding="utf-8"), 100, seed=0), out / "tasks" / f"{name}.jsonl")
        tasks.append(f"{{name: {name}, path: {path}, role: {role}}}")
    return f"--eval.tasks=[{', '.join(tasks)}]"


def continue_on_spanish(out: Path, english: Path, pretrained: Path, steps: int | None) -> None:
    """Continual pretraining of the demo model on Spanish with rewarm and replay; the loop prints
    the forgetting report at the end, validation losses and task accuracies."""
    spanish = prepare(out, "spanish", "rv1909_nt.txt", ["--tokenizer", str(english / "tokenizer.model")])
    print("\ncontinual pretraining on spanish (rewarm, 10% english replay)")
    overrides = [f"--run_dir={out / 'runs' / 'continual'}", f"--model.init_from={pretrained}",
                 f"--data.domains=[{{name: spanish, path: {spanish}}}]", f"--data.replay=[{{name: english, path: {english}}}]",
                 word_order_tasks(out)]
    if steps:
        overrides.append(f"--train.max_tokens={steps * 8192}")
    run(load_config(CONTINUAL_CONFIG, overrides), overwrite=True)
