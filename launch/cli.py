"""The `cptrain` command. Parsers live here (cheap to import, so `--help` is instant); each
subcommand's work lives in the module that owns it and is imported only when it runs."""
from __future__ import annotations

import argparse
import importlib
import sys

from launch.errors import UserError


def _dispatch(target: str):
    def run(args):
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(args)
    return run


def _add(sub, name, target, help):
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(func=_dispatch(target))
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cptrain", description="Pretraining and continual pretraining of Llama-family LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _add(sub, "demo", "trainer.demo:main", "The built-in end-to-end demo on the shipped corpus (CPU is enough).")
    p.add_argument("--out", default="demo_out", help="output folder (data, runs, plots)")
    p.add_argument("--steps", type=int, default=None, help="override the demo's pretraining steps")

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    p = _add(data, "prepare", "data_pipeline.prepare:main", "Tokenize, pack and write MDS shards plus manifest.json.")
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (jsonl/json, parquet, txt)")
    p.add_argument("--out", required=True, help="output directory")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="a sentencepiece .model, or an HF model/tokenizer folder")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB", help="train a sentencepiece tokenizer of this vocabulary size")
    p.add_argument("--tokenizer-type", choices=["bpe", "unigram"], default="bpe", help="sentencepiece model type when training")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per packed sample")
    p.add_argument("--text-field", default="text", help="field holding the text in json/jsonl/parquet inputs")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out for validation")
    p.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizer processes")
    p.add_argument("--tokenizer-threads", type=int, default=0,
                   help="sentencepiece threads per process (0: all cores with --num-proc 1, else 1)")
    p.add_argument("--on-bad-record", choices=["skip", "fail"], default="skip", help="what a malformed record does")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val document split")
    p.add_argument("--txt-split", choices=["document", "paragraph", "line"], default="document",
                   help="what one document is in .txt inputs (a whole file by default)")
    p.add_argument("--chunk-mb", type=float, default=64.0,
                   help="MB of text per chunk, the unit a rerun after an interruption skips when done")

    p = _add(sub, "train", "trainer.loop:main", "Train from a YAML config, in this process or under a launcher.")
    p.add_argument("config", help="YAML config")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest good checkpoint")

    p = _add(sub, "launch", "launch.launchers:main", "Print and run (or, for slurm, write) the real launcher command.")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun", "slurm"], required=True)
    p.add_argument("--hostfile")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--node-rank", type=int, default=None)
    p.add_argument("--master-addr", default=None)
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--no-ssh", action="store_true", help="start each node separately (with --node-rank)")
    p.add_argument("--slurm-backend", choices=["deepspeed", "torchrun"], default="torchrun")
    p.add_argument("--slurm-out", default=None, help="where to write the sbatch script")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("config")

    conv = sub.add_parser("convert", help="checkpoint import/export").add_subparsers(dest="convert_command", required=True)
    p = _add(conv, "hf-to-cptrain", "model.hf:cli_hf_to_cptrain", "Import an HF Llama folder as cptrain weights.")
    p.add_argument("src"); p.add_argument("out")
    p = _add(conv, "cptrain-to-hf", "trainer.checkpoint:cli_export_hf", "Export a cptrain checkpoint (any engine) as an HF folder.")
    p.add_argument("src"); p.add_argument("out")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")

    sched = sub.add_parser("schedule", help="learning-rate schedules").add_subparsers(dest="schedule_command", required=True)
    p = _add(sched, "plot", "trainer.schedule:cli_plot", "Draw a config's LR schedule before running it.")
    p.add_argument("config"); p.add_argument("--out", required=True)

    p = _add(sub, "report", "trainer.report:main", "Plots and a summary of a run.")
    p.add_argument("run_dir"); p.add_argument("--out", default=None)

    scaling = sub.add_parser("scaling", help="scaling-law fitting").add_subparsers(dest="scaling_command", required=True)
    p = _add(scaling, "fit", "trainer.scaling.cli:fit", "Fit a scaling law; writes DIR/fit.json and plots.")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--law", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bootstrap", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-col", default="params"); p.add_argument("--d-col", default="tokens"); p.add_argument("--loss-col", default="loss")
    p = _add(scaling, "predict", "trainer.scaling.cli:predict", "Predictions from a fit.")
    p.add_argument("--fit", required=True)
    p.add_argument("--curve", default=None); p.add_argument("--out", default=None)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `train` and `launch` take `--section.key=value` overrides; everything else must parse fully.
    if extra and args.command not in ("train", "launch"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"cptrain: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
