"""Dense vs upcycled continual pretraining at CPU scale, for the same token budget (docs/continual.md).

    python bench/upcycle_experiment.py [--out runs/upcycle_experiment] [--device cpu]

Pretrains the demo's tiny Llama (dim 128, 4 layers, 4 heads / 2 KV, vocab 4096) on English (Austen),
then continues it on Spanish (Reina-Valera, English tokenizer) with 10% English replay three ways,
each for the same tokens and schedule: (a) the dense model; (b) upcycled into a Mixtral-style mixture of
8 experts, top 2 (Komatsuzaki et al. 2022: experts copies of the MLP, a new router); (c) the same with
Drop-Upcycling, half of each expert's units redrawn (Nakamura et al. 2025, r = 0.5). Writes
OUT/results.md and .json: English (old) and Spanish (new) validation losses at the start and the end,
forgetting, parameters (total / active) and tokens/s of each arm.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

STEP = 4096                                # tokens per optimizer step: 16 sequences of 256
PRETRAIN_STEPS, CONT_STEPS, EVAL_STEPS = 64, 32, 8
ARMS = {"dense": None, "upcycled r=0": 0.0, "drop-upcycled r=0.5": 0.5}  # name -> Drop-Upcycling fraction
EXPERTS, TOP_K = 8, 2


def _common(run_dir: Path, device: str) -> list[str]:
    # fp32 everywhere, so a GPU run computes what the CPU run does
    return [f"--run_dir={run_dir}", f"--train.device={device}", "--train.precision=fp32", f"--train.global_batch_tokens={STEP}",
            "--train.micro_batch_size=16", "--log.progress=false", "--eval.max_samples=24", "--checkpoint.keep_last=1"]


def pretrain(out: Path, english: Path, device: str) -> Path:
    from cptrain.launch.demo import CONFIG
    from cptrain.trainer.config import load_config
    from cptrain.trainer.loop import run

    run_dir = out / "pretrain"
    if not (run_dir / "checkpoints" / "latest").is_file():
        run(load_config(CONFIG, [*_common(run_dir, device), f"--data.domains=[{{name: english, path: {english}}}]",
                                 f"--train.max_tokens={PRETRAIN_STEPS * STEP}", "--schedule.kind=cosine", "--schedule.lr=3e-3",
                                 f"--schedule.warmup_tokens={4 * STEP}", "--schedule.min_lr_ratio=0.1",
                                 f"--eval.interval_tokens={16 * STEP}", "--continual.report=off"]))
    return run_dir


def starting_point(out: Path, pretrained: Path, drop: float | None) -> Path:
    """The dense checkpoint, or its upcycled HF folder (`cptrain upcycle`)."""
    from cptrain.launch.cli import main as cli

    if drop is None:
        return pretrained
    folder = out / f"upcycled-r{drop}"
    if not (folder / "config.json").is_file():
        assert cli(["upcycle", str(pretrained), "--experts", str(EXPERTS), "--top-k", str(TOP_K), "--drop-fraction", str(drop),
                    "--out", str(folder)]) == 0
    return folder


def continue_on_spanish(out: Path, name: str, start: Path, english: Path, spanish: Path, device: str) -> dict:
    from cptrain.trainer.config import load_config
    from cptrain.trainer.loop import run

    run_dir = out / name.replace(" ", "_").replace("=", "")
    rows = run(load_config(None, [
        *_common(run_dir, device), f"--model.init_from={start}", "--data.seq_len=256",
        f"--data.domains=[{{name: spanish, path: {spanish}}}]", f"--data.replay=[{{name: english, path: {english}}}]",
        "--data.replay_fraction=0.1", f"--train.max_tokens={CONT_STEPS * STEP}", "--schedule.kind=cosine", "--schedule.lr=1e-3",
        f"--schedule.warmup_tokens={4 * STEP}", "--schedule.min_lr_ratio=0.1", f"--eval.interval_tokens={EVAL_STEPS * STEP}",
        "--continual.old_domains=[english]", "--continual.new_domains=[spanish]"]), overwrite=True)
    evals = [r for r in rows if "val/english" in r]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    info = json.loads((run_dir / "run_info.json").read_text())
    return {"en_start": evals[0]["val/english"], "en_end": evals[-1]["val/english"], "es_start": evals[0]["val/spanish"],
            "es_end": evals[-1]["val/spanish"], "forgetting": evals[-1]["val/english"] - evals[0]["val/english"],
            "train_loss_end": [r["loss"] for r in rows if "loss" in r][-1], "params": info["params"],
            "params_active": info["params_active"], "tokens_per_s": sum(speeds) / len(speeds),
            "curve": [(r["tokens"], r["val/english"], r["val/spanish"]) for r in evals]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/upcycle_experiment")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    from cptrain.launch.demo import prepare

    out = Path(args.out)
    english = prepare(out, "english", "austen.txt", ["--train-tokenizer", "4000"])
    spanish = prepare(out, "spanish", "rv1909_nt.txt", ["--tokenizer", str(english / "tokenizer.model")])
    pretrained = pretrain(out, english, args.device)
    results = {name: continue_on_spanish(out, name, starting_point(out, pretrained, drop), english, spanish, args.device)
               for name, drop in ARMS.items()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| arm | params (active) | EN start | EN end | forgetting | ES start | ES end | train loss end | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['params'] / 1e6:.2f}M ({r['params_active'] / 1e6:.2f}M) | {r['en_start']:.3f} | "
                     f"{r['en_end']:.3f} | {r['forgetting']:+.3f} | {r['es_start']:.3f} | {r['es_end']:.3f} | "
                     f"{r['train_loss_end']:.3f} | {r['tokens_per_s']:,.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
