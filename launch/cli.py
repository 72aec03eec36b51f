"""The `cptrain` command's parsers. Each subcommand names its body in launch/commands.py, which
imports the modules doing the work only when the command runs, so `--help` is instant."""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from . import commands


def _add(sub, name, func, help):
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(func=func, parser=p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cptrain", description="Pretraining and continual pretraining of decoder LLMs (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2/3, OLMo 2; the mixtures of experts Qwen2/3-MoE, OLMoE, Mixtral).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _add(sub, "demo", commands.demo, "The built-in end-to-end demo on the shipped corpus (CPU is enough).")
    p.add_argument("--out", default="demo_out", help="output folder (data, runs, plots)")
    p.add_argument("--steps", type=int, default=None, help="override the demo's pretraining steps")
    p.add_argument("--continual-steps", type=int, default=None, help="override the demo's continual-pretraining steps")

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    p = _add(data, "prepare", commands.data_prepare, "Tokenize, pack and write MDS shards plus manifest.json.")
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (jsonl/json, parquet, txt)")
    p.add_argument("--out", required=True, help="output directory, or an object-store URL (s3://bucket/prefix) "
                   "the directory is uploaded to as it is written")
    p.add_argument("--work-dir", default=None, help="with an --out URL: the local folder the directory is built in "
                   "(default: one per URL under ~/.cache/cptrain/prepare; a rerun finds its progress there)")
    p.set_defaults(url_options=("out",))
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
    p.add_argument("--min-doc-tokens", type=int, default=0, metavar="N",
                   help="keep only documents of at least N tokens (EOS included): a long-document domain; "
                        "the documents dropped are counted in the report and manifest")
    p.add_argument("--part", default=None, metavar="I/N",
                   help="prepare only chunks c with c mod N = I (one of N processes or nodes; needs --tokenizer); "
                        "join the N part directories with `cptrain data merge`")

    p = _add(data, "merge", commands.data_merge,
             "Join the directories of `data prepare --part I/N` (all N) into one prepared directory.")
    p.add_argument("parts", nargs="+", help="the part directories, in any order")
    p.add_argument("--out", required=True, help="output directory, or an object-store URL to upload it to")
    p.add_argument("--work-dir", default=None, help="with an --out URL: the local folder the directory is built in")
    p.set_defaults(url_options=("out",))

    p = _add(sub, "train", commands.train, "Train from a YAML config, in this process or under a launcher.")
    p.add_argument("config", help="YAML config")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the run directory's latest good checkpoint")
    mode.add_argument("--overwrite", action="store_true",
                      help="start anew in a run directory that holds a run, moving the old run aside (never deleted)")

    p = _add(sub, "launch", commands.launch, "Print and run (or, for slurm, write) the real launcher command.")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun", "slurm"], required=True)
    p.add_argument("--hostfile", help="deepspeed hostfile (`HOST slots=GPUS` per line); written for --nodes > 1 if absent")
    p.add_argument("--nodes", type=int, default=None, help="number of machines (default 1, or every host of --hostfile)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="processes per machine (default: its GPUs; 1 on CPU)")
    p.add_argument("--node-rank", type=int, default=None, help="this machine's index (start each node yourself)")
    p.add_argument("--master-addr", default=None, help="address of node 0")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--no-ssh", action="store_true", help="deepspeed: start each node separately (with --node-rank)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="pass --resume to `cptrain train`")
    mode.add_argument("--overwrite", action="store_true", help="pass --overwrite to `cptrain train`")
    p.add_argument("--slurm-backend", choices=["deepspeed", "torchrun"], default="torchrun",
                   help="the per-node launcher inside the sbatch script")
    p.add_argument("--slurm-out", default=None, help="where to write the sbatch script (default RUN_DIR/launch.sbatch)")
    p.add_argument("--slurm-warning", type=int, default=120,
                   help="seconds before the time limit at which Slurm sends USR1 (the trainer checkpoints and requeues)")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("config")

    conv = sub.add_parser("convert", help="checkpoint import/export").add_subparsers(dest="convert_command", required=True)
    p = _add(conv, "hf-to-cptrain", commands.hf_to_cptrain, "Import an HF folder as cptrain weights.")
    p.add_argument("src")
    p.add_argument("out")
    p = _add(conv, "cptrain-to-hf", commands.cptrain_to_hf, "Export a cptrain checkpoint (any engine) as an HF folder.")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")

    p = _add(sub, "eval", commands.evaluate,
             "Score a model (HF folder, run directory, checkpoint or weights folder): mean next-token loss on a prepared "
             "split (--data), multiple-choice accuracy by log-likelihood (--task), passkey retrieval (--passkey).")
    p.add_argument("model", help="an HF folder, a cptrain run directory, checkpoint or weights folder")
    p.add_argument("--data", default=None, help="a directory written by `cptrain data prepare`, or its URL (s3://...)")
    p.set_defaults(url_options=("data",))
    p.add_argument("--task", nargs="+", default=[], help='JSON lines task files ({"context", "choices", "answer"} per line)')
    p.add_argument("--num-fewshot", type=int, default=0, help="tasks: examples from the same file before each item")
    p.add_argument("--max-items", type=int, default=0, help="tasks: score the first N items of each file (0: all)")
    p.add_argument("--log-samples", action="store_true", help="tasks: every item's choice scores and pick in the JSON")
    p.add_argument("--lm-eval", nargs="+", default=[], metavar="TASK",
                   help="lm-evaluation-harness task names (needs the lm-eval package), scored through its own library")
    p.add_argument("--lm-eval-include", default=None, metavar="DIR", help="a folder of lm-evaluation-harness task YAMLs of your own")
    p.add_argument("--tokenizer", default=None, help="tasks: the model's tokenizer, when MODEL is neither an HF folder nor a run")
    p.add_argument("--split", default="val", help="the split to score (val or train)")
    p.add_argument("--max-samples", type=int, default=None, help="score only the first N samples of the split")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--position-buckets", default=None, metavar="P0,P1,...",
                   help="with --data: also the loss by token position; 0,1024,4096 gives [0, 1024), [1024, 4096) and "
                        "[4096, row end) (JSON: \"positions\")")
    p.add_argument("--passkey", default=None, metavar="L1,L2,...",
                   help="passkey retrieval accuracy at these prompt lengths in tokens, each at most the model's max_seq_len "
                        "(greedy exact match of the key; docs/long_context.md)")
    p.add_argument("--passkey-depths", default=None, metavar="D1,D2,...",
                   help="passkey: where the key sits in the filler, 0 first to 1 last (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--passkey-trials", type=int, default=None, help="passkey: prompts per length and depth (default 4)")
    p.add_argument("--passkey-kind", choices=["single", "multikey"], default=None,
                   help="passkey: one pass key (default), or several named numbers of which one is asked for (RULER)")
    p.add_argument("--passkey-keys", type=int, default=None, help="passkey multikey: needles per prompt (default 4)")
    p.add_argument("--passkey-seed", type=int, default=None, help="passkey: seed of keys, names and places (default 0)")
    p.add_argument("--json", default=None,
                   help='write {"loss", "tokens", ...}, {"tasks": {...}} and/or {"passkey": {LENGTH: {"acc", "depths"}}} to this file')

    vocab = sub.add_parser("vocab", help="vocabulary extension").add_subparsers(dest="vocab_command", required=True)
    p = _add(vocab, "extend", commands.vocab_extend,
             "Extend a model's tokenizer with tokens learned on a new-language corpus and grow its embeddings; "
             "writes an HF folder that transformers loads.")
    p.add_argument("--model", required=True, help="an HF folder, or a cptrain run directory, checkpoint or weights folder")
    p.add_argument("--corpus", nargs="+", required=True, help=".txt or .jsonl (text field) files in the new language")
    p.add_argument("--add", type=int, required=True, help="how many tokens to add at most")
    p.add_argument("--out", required=True, help="the HF folder to write (must not exist)")
    p.add_argument("--keep", nargs="+", default=[],
                   help="old-language texts whose tokenization must not change; the report's reference sample "
                        "(default: a built-in English sample, 60K characters of Austen)")
    p.add_argument("--protect-reference", action="store_true",
                   help="make no new token that would change how the reference sample tokenizes (the built-in English "
                        "sample, when no --keep is given; --keep texts are always protected): fewer new tokens fire in "
                        "the old language, a little less gain in the new one")
    p.add_argument("--init", choices=["mean", "random"], default="mean",
                   help="new rows: mean of the base rows of the token's pieces (Fast Vocabulary Transfer), or random")
    p.add_argument("--pad-multiple", type=int, default=64, help="embedding rows padded to a multiple of this")
    p.add_argument("--tokenizer", default=None, help="the model's tokenizer, when MODEL is not an HF folder or a run")
    p.add_argument("--json", default=None, help="write the report here too (it is also OUT/vocab_extension.json)")

    p = _add(sub, "upcycle", commands.upcycle,
             "Turn a dense model into a mixture of experts whose experts are copies of its MLP and whose routers are new "
             "(Sparse Upcycling; Drop-Upcycling re-initializes --drop-fraction of each expert's units). At --drop-fraction 0 "
             "it computes the dense model's function. Writes an HF folder that trains, evaluates and exports like any.")
    p.add_argument("model", help="an HF folder, or a cptrain run directory, checkpoint or weights folder (a dense model)")
    p.add_argument("--experts", type=int, required=True, help="experts per layer")
    p.add_argument("--top-k", type=int, required=True, help="experts each token is routed to")
    p.add_argument("--drop-fraction", type=float, default=0.0,
                   help="fraction of each expert's intermediate units re-initialized (Drop-Upcycling: 0.5; 0: exact copies)")
    p.add_argument("--family", choices=["qwen3_moe", "mixtral"], default=None,
                   help="the mixture-of-experts family (default: mixtral for llama and mistral, qwen3_moe for qwen3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the routers and of the re-initialized units")
    p.add_argument("--tokenizer", default=None, help="the model's tokenizer, when MODEL is neither an HF folder nor a run")
    p.add_argument("--out", required=True, help="the HF folder to write (must not exist)")

    p = _add(sub, "anneal", commands.anneal,
             "Anneal branch: from a checkpoint of a constant (WSD stable, infinite) phase, decay to the floor in a new run "
             "directory, resuming the checkpoint exactly; the main run is left untouched. Extra --section.key=value "
             "overrides apply to the branch (e.g. --eval.interval_tokens=1M).")
    p.add_argument("run_dir", help="the main run's directory")
    p.add_argument("--tokens", required=True, help="anneal length in tokens (10M, 1.5B; a multiple of the batch)")
    p.add_argument("--checkpoint", default=None, help="checkpoint name, e.g. step-00001000 (default: the latest good one)")
    p.add_argument("--shape", default="linear", help="linear | cosine | 1-sqrt | exponential")
    p.add_argument("--out", required=True, help="the branch's run directory")
    p.add_argument("--no-train", action="store_true", help="write the branch's config and checkpoint link only")

    p = _add(sub, "merge", commands.merge,
             "Checkpoint merging: a weighted average of a run's checkpoints (or of their weight EMAs) as a weights "
             "folder that trains (model.init_from), evaluates, anneals and exports like any checkpoint. --shape picks "
             "the weights that emulate that LR decay over the merged window (WSM, Tian et al. 2025).")
    p.add_argument("run_dir", help="the run's directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--last", type=int, help="merge the K newest checkpoints")
    which.add_argument("--steps", help="merge these checkpoints, e.g. 1000,2000,3000")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--weights", type=float, nargs="+", help="one weight per checkpoint, oldest first, summing to 1 (default: uniform)")
    how.add_argument("--shape", choices=["linear", "cosine", "1-sqrt"], help="weights that emulate this decay over the window")
    p.add_argument("--ema", action="store_true", help="average the checkpoints' EMAs of the weights (train.ema_decay) instead")
    p.add_argument("--out", required=True, help="the weights folder to write (must not exist)")

    p = _add(sub, "forgetting", commands.forgetting,
             "Forgetting report of a run: old- and new-domain validation losses against its first evaluation.")
    p.add_argument("run_dir")
    p.add_argument("--old", default=None, help="comma-separated old domains (default: continual.old_domains or replay)")
    p.add_argument("--new", default=None, help="comma-separated new domains (default: continual.new_domains or data.domains)")
    p.add_argument("--fit", default=None, help="fit.json of `cptrain scaling fit --law cpt`: draw its prediction of this run beside the measured curves")

    sched = sub.add_parser("schedule", help="learning-rate schedules").add_subparsers(dest="schedule_command", required=True)
    p = _add(sched, "plot", commands.schedule_plot, "Draw a config's LR schedule before running it.")
    p.add_argument("config")
    p.add_argument("--out", required=True)

    p = _add(sub, "report", commands.report, "Plots and a summary of a run.")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)

    scaling = sub.add_parser("scaling", help="scaling-law fitting").add_subparsers(dest="scaling_command", required=True)
    p = _add(scaling, "fit", commands.scaling_fit, "Fit a scaling law; writes DIR/fit.json and plots.")
    p.add_argument("inputs", nargs="+", help="run directories or CSV files (loss-curve laws: step,lr,loss CSVs or run directories)")
    p.add_argument("--law", required=True, help="chinchilla, chinchilla_sparse, kaplan, gadre (over N, D); multipower, tissue (loss curves); "
                   "cpt (continual runs' curves per domain, Wang et al. 2025), dcpt (N, D, mixture ratio, Que et al. 2024)")
    p.add_argument("--out", required=True, help="output directory for fit.json and plots")
    p.add_argument("--bootstrap", type=int, default=0, metavar="K", help="(N, D), cpt and dcpt laws: K bootstrap refits for 95%% intervals")
    p.add_argument("--seed", type=int, default=0, help="bootstrap resampling seed")
    p.add_argument("--n-col", default="params", help="CSV column (or run_info.json key) of parameter counts")
    p.add_argument("--d-col", default="tokens", help="CSV column of token counts")
    p.add_argument("--r-col", default="r", help="dcpt CSV: column of the mixture ratio of the loss's domain")
    p.add_argument("--pretrain", default=None, metavar="RUN_OR_CHECKPOINT",
                   help="cpt: the pretraining run (or its checkpoint) the runs continue (default: their model.init_from)")
    p.add_argument("--loss-col", default="loss", help="CSV column (or metrics.jsonl key) of the final loss")
    p.add_argument("--where", action="append", metavar="COL=VALUE", help="CSV inputs: keep only rows with this value (repeatable)")
    p.add_argument("--starts", type=int, default=0, help="(N, D) laws: L-BFGS from the K best grid starts only (0 = the whole published grid)")
    p.add_argument("--holdout-largest", type=int, default=0, metavar="K", help="hold out the K runs of largest compute 6ND and report the extrapolation error")
    p.add_argument("--holdout-above-n", type=float, default=None, metavar="N", help="hold out every run with at least N parameters")
    p = _add(scaling, "predict", commands.scaling_predict, "Predictions from a fit.")
    p.add_argument("--fit", required=True, help="DIR/fit.json written by `cptrain scaling fit`")
    p.add_argument("--curve", default=None, help="loss-curve laws: schedule CSV (step,lr[,loss]); writes step,lr,loss_pred to --out")
    p.add_argument("--out", default=None, help="output CSV")
    p.add_argument("--n", type=float, nargs="+", default=None, help="(N, D) laws: parameter counts")
    p.add_argument("--d", type=float, nargs="+", default=None, help="(N, D) laws: token counts")
    p.add_argument("--compute", type=float, nargs="+", default=None, help="(N, D) laws: compute budgets C = 6ND for the compute-optimal allocation")
    p.add_argument("--replay", type=float, default=None, help="cpt, dcpt: the replay fraction (old data in the mixture) to predict at")
    p = _add(scaling, "suggest", commands.scaling_suggest,
             "Peak LR and batch size from Step Law (Li et al. 2025); with --fit, the compute-optimal N, D of a fitted law; "
             "with --cpt/--dcpt and --max-forgetting, the replay fraction (and schedule) of a continual pretraining.")
    p.add_argument("--params", type=float, default=None, help="N: non-embedding parameters (Step Law's N; with --dcpt, the N to predict at)")
    p.add_argument("--tokens", type=float, required=True, help="D: training tokens")
    p.add_argument("--fit", default=None, help="DIR/fit.json of an (N, D) law from `cptrain scaling fit`: adds N_opt, D_opt at C")
    p.add_argument("--compute", type=float, default=None, help="with --fit: the compute budget C in FLOPs (default 6 N D)")
    p.add_argument("--seq-len", type=int, default=None, help="also give the batch size in sequences of this many tokens")
    p.add_argument("--cpt", default=None, metavar="FIT", help="fit.json of --law cpt: choose replay fraction and schedule")
    p.add_argument("--dcpt", default=None, metavar="FIT", help="fit.json of --law dcpt: choose the replay fraction")
    p.add_argument("--max-forgetting", type=float, default=None, metavar="X",
                   help="with --cpt/--dcpt: the old domains' loss may end at most X above its start (a fraction: 0.03 = 3%%)")
    p.add_argument("--batch-tokens", type=int, default=None, help="with --cpt: tokens per step (default: the fitted runs')")
    p.add_argument("--out", default=None, help="with --cpt: the plot of the predicted curves (default: suggest.png beside FIT)")
    return parser


def _refuse_urls(args) -> None:
    """A URL given where a local path is expected is an error, never a folder named `s3:`; the
    options that take URLs are listed by their command (`url_options`)."""
    from ..data_pipeline.remote import local_path
    names = {a.dest: (a.option_strings or [a.dest])[-1] for a in args.parser._actions}
    for dest, value in vars(args).items():
        if dest in ("overrides", *getattr(args, "url_options", ())):
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                local_path(v, names.get(dest, dest))


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `train`, `launch` and `anneal` take `--section.key=value` overrides; everything else must parse fully.
    if extra and args.command not in ("train", "launch", "anneal"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        _refuse_urls(args)
        return args.func(args) or 0
    except UserError as e:
        # One line whatever the message quotes (a path or key may hold a newline or control character).
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(e))
        print(f"cptrain: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
