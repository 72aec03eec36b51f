"""The body of every `cptrain` command, which launch/cli.py's parsers name. Each reads its
arguments, calls the functions of the modules that own the work and prints what was done; none holds
logic of its own. Those modules (and torch) are imported inside each body, when the command runs, so
building the parser imports nothing heavy and `cptrain --help` stays instant."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import UserError


def demo(args) -> int:
    from .demo import main

    return main(args)


def data_prepare(args) -> int:
    from ..data_pipeline.prepare import main

    return main(args)


def data_merge(args) -> int:
    from ..data_pipeline.merge import main

    return main(args)


def launch(args) -> int:
    from .launchers import main

    return main(args)


def report(args) -> int:
    from ..trainer.analysis.report import main

    return main(args)


def scaling_fit(args) -> int:
    from ..trainer.analysis.scaling.cli import fit

    return fit(args)


def scaling_predict(args) -> int:
    from ..trainer.analysis.scaling.cli import predict

    return predict(args)


def scaling_suggest(args) -> int:
    from ..trainer.analysis.scaling.suggest import suggest

    return suggest(args)


def train(args) -> int:
    """`cptrain train CONFIG [--resume | --overwrite] [overrides]`."""
    import torch.distributed as dist

    from ..trainer.config import load_config
    from ..trainer.loop import run

    run(load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def anneal(args) -> int:
    """`cptrain anneal RUN_DIR --tokens N [--checkpoint step-X] [--shape S] --out BRANCH [overrides]`."""
    from ..trainer.branch import BRANCH_FILE, prepare_branch
    from ..trainer.config import parse_int
    from ..trainer.loop import run

    tokens = parse_int(args.tokens, "--tokens", "cptrain anneal")
    cfg = prepare_branch(args.run_dir, args.out, tokens, args.shape, args.checkpoint, args.overrides)
    info = json.loads((Path(args.out) / BRANCH_FILE).read_text())
    print(f"anneal branch of {info['parent_run']} at {info['parent_checkpoint']} ({info['at_tokens']:,} tokens, "
          f"lr {info['parent_lr']:.4g}): {args.shape} to {cfg.schedule.min_lr_ratio * cfg.schedule.lr:.4g} over "
          f"{tokens:,} tokens in {args.out}")
    if args.no_train:
        print(f"wrote {Path(args.out) / 'config.yaml'}; train it with `cptrain train {Path(args.out) / 'config.yaml'} --resume` "
              "(or under `cptrain launch`)")
        return 0
    run(cfg, resume=True)
    return 0


def merge(args) -> int:
    """`cptrain merge RUN_DIR (--last K | --steps A,B,...) [--weights W... | --shape S] [--ema] --out DIR`."""
    from ..trainer.averaging import merge_checkpoints, merge_coefficients, pick_checkpoints, write_merged
    from ..model.hf import copy_tokenizer
    from ..trainer.checkpoint import step_of
    from ..trainer.config import parse_int
    from ..trainer.evaluate import tokenizer_for

    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} exists; pick a new --out (nothing is written over)")
    steps = [parse_int(s, "--steps", "cptrain merge") for s in args.steps.split(",")] if args.steps else None
    folders = pick_checkpoints(Path(args.run_dir), args.last, steps)
    coefficients = merge_coefficients(len(folders), args.weights, args.shape)
    cfg, state = merge_checkpoints(folders, coefficients, ema=args.ema)
    info = {"run_dir": str(args.run_dir), "checkpoints": [str(f) for f in folders], "coefficients": coefficients,
            "shape": args.shape, "ema": args.ema}
    write_merged(out, cfg, state, info)
    try:  # the run's tokenizer beside the weights, so `cptrain eval OUT --task ...` finds it
        copy_tokenizer(tokenizer_for(args.run_dir), out)
    except UserError:
        pass  # no tokenizer found: `cptrain eval --tokenizer` names it then
    what = "weight EMAs" if args.ema else "weights"
    print(f"merged the {what} of {len(folders)} checkpoints of {args.run_dir} (steps "
          f"{', '.join(str(step_of(f)) for f in folders)}) with weights {', '.join(f'{c:.4g}' for c in coefficients)}"
          f"{f' ({args.shape} decay)' if args.shape else ''} into {out}; train from it with --model.init_from={out}, "
          f"score it with `cptrain eval {out} --data DIR`, export it with `cptrain convert cptrain-to-hf {out} HF_DIR`")
    return 0


def forgetting(args) -> int:
    """`cptrain forgetting RUN_DIR [--old A,B] [--new C]`: the report for any finished run."""
    from ..trainer.analysis.forgetting import format_forgetting, write_forgetting
    from ..trainer.config import load_config
    from ..trainer.continual import split_domains

    run_dir = Path(args.run_dir)
    cfg = load_config(run_dir / "config.yaml")
    old, new = split_domains(cfg)
    old = args.old.split(",") if args.old else old
    new = args.new.split(",") if args.new else new
    predicted = None
    if args.fit:  # a fitted CPT law's prediction of this run, from its own LR and replay fraction
        import numpy as np

        from ..trainer.analysis.scaling import cpt_runs

        res = cpt_runs.load(args.fit)
        run = cpt_runs.read_run(run_dir, pretrain="")
        tokens = np.arange(len(run.lr)) * run.batch_tokens
        predicted = {d: (tokens, v) for d, v in cpt_runs.predict_schedule(res, run.lr, cpt_runs.check_replay(
            res, run.replay, f"{run_dir}: data.replay_fraction")).items()}
    rep = write_forgetting(run_dir, old, new, {t.stem: t.role for t in cfg.eval.tasks}, predicted)
    print(format_forgetting(rep, str(run_dir)), end="")
    for d, v in rep.get("predicted_end", {}).items():
        print(f"- {d}: the fitted law ({args.fit}) predicts {v:.4f} at the end")
    print(f"wrote {run_dir / 'forgetting.md'}, .json and .png")
    return 0


def evaluate(args) -> int:
    """`cptrain eval MODEL [--data DIR] [--task FILE...] [--lm-eval TASK...] [--passkey L,...] [--json FILE]`."""
    import torch

    from ..data_pipeline.remote import check_url, is_url
    from ..data_pipeline.tokenizer import load_tokenizer
    from ..trainer import tasks as T
    from ..trainer.engines.spec import autocast_for, uses_bf16
    from ..trainer.evaluate import check_vocab, load_model, lm_eval_tasks, split_loss, tokenizer_for, write_json
    from ..trainer.positions import check_bounds

    if args.position_buckets and not args.data:
        raise UserError("--position-buckets splits the loss of --data DIR by token position; give --data too")
    if not (args.data or args.task or args.lm_eval or args.passkey):
        raise UserError("cptrain eval needs --data DIR (a loss), --task FILE... or --lm-eval TASK... (accuracy) "
                        "or --passkey LENGTHS (retrieval)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but this machine has no usable CUDA device; use --device auto or cpu")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    buckets = check_bounds(args.position_buckets, "--position-buckets") if args.position_buckets else ()
    needs_tokenizer = args.task or args.lm_eval or args.passkey
    tokenizer = load_tokenizer(tokenizer_for(args.model, args.tokenizer)) if needs_tokenizer else None
    specs = [T.TaskConfig(path=f, num_fewshot=args.num_fewshot, max_items=args.max_items) for f in args.task]
    items = {s.stem: T.load_items(s.path, s.max_items) for s in specs}  # bad task files fail before the model loads
    suite = _passkey_suite(args, tokenizer) if args.passkey else None  # so do passkey lengths the model cannot read
    if args.data and is_url(args.data):
        check_url(args.data)  # so does a URL scheme we cannot read
    model = load_model(args.model, device)
    result = {}
    if args.data:
        result = split_loss(model, args.data, args.split, args.max_samples, args.batch_size, args.precision,
                            position_buckets=buckets)
        print(f"{args.model} on {args.data} ({args.split}, {result['samples']:,} samples, {result['tokens']:,} target "
              f"tokens): loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}")
        if buckets:
            print("loss by position: " + ", ".join(f"{k} {v:.4f}" for k, v in result["positions"].items()))
    if tokenizer is not None:
        check_vocab(model, tokenizer.vocab_size, str(tokenizer.path))
    for spec in specs:
        requests = T.build_requests(items[spec.stem], tokenizer, spec.num_fewshot, spec.seed, model.cfg.max_seq_len)
        with autocast_for(device, uses_bf16(args.precision, device.type)):
            scores = T.loglikelihoods(model, requests, args.batch_size, device, progress=True)
        done = T.summarize(items[spec.stem], requests, scores, args.log_samples)
        result.setdefault("tasks", {})[spec.stem] = done
        print(f"{spec.stem}: acc {done['acc']:.4f}, acc_norm {done['acc_norm']:.4f} over {done['n']:,} items "
              f"({spec.num_fewshot}-shot)")
    if args.lm_eval:
        for name, metrics in lm_eval_tasks(model, tokenizer, args.lm_eval, args.num_fewshot, args.batch_size,
                                           args.max_items or None, args.lm_eval_include).items():
            result.setdefault("tasks", {})[name] = metrics
            print(f"{name} (lm-evaluation-harness): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                                   if isinstance(v, float)))
    if suite is not None:
        result.update(_passkey_scores(suite, model, device, args.precision))
    if args.json:
        write_json(args.json, result)
    return 0


def _passkey_suite(args, tokenizer):
    """The prompts of --passkey and its options, checked against the model's window before it loads."""
    from ..trainer.checkpoint import model_config_of
    from ..trainer.config import parse_int
    from ..trainer.passkey import PasskeyConfig, build_suite

    given = {"lengths": [parse_int(n, "--passkey", "cptrain eval") for n in args.passkey.split(",")],
             "depths": _fractions(args.passkey_depths, "--passkey-depths") if args.passkey_depths else None,
             "trials": args.passkey_trials, "kind": args.passkey_kind, "keys": args.passkey_keys,
             "seed": args.passkey_seed, "batch_size": args.batch_size}
    cfg = PasskeyConfig(**{k: v for k, v in given.items() if v is not None})  # the rest: eval.passkey's defaults
    cfg.check(model_config_of(args.model).max_seq_len, "--passkey")
    return build_suite(cfg, tokenizer)


def _fractions(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"{flag}: {text!r} must be comma-separated fractions, e.g. 0,0.5,1") from None


def _passkey_scores(suite, model, device, precision: str) -> dict:
    """{"passkey": {length: {"acc", "n", "depths"}}, "passkey_config": ...}, printed one line per length."""
    import dataclasses

    from ..trainer import tasks as T
    from ..trainer.engines.spec import autocast_for, uses_bf16
    from ..trainer.passkey import summarize

    with autocast_for(device, uses_bf16(precision, device.type)):
        scores = T.loglikelihoods(model, suite.requests, suite.cfg.batch_size, device, progress=True)
    result = summarize(suite, scores)
    for length, r in result.items():
        print(f"passkey ({suite.cfg.kind}) at {int(length):,} tokens: acc {r['acc']:.4f} over {r['n']} prompts; "
              "by depth " + ", ".join(f"{d} {acc:.2f}" for d, acc in r["depths"].items()))
    config = {k: v for k, v in dataclasses.asdict(suite.cfg).items() if k not in ("lengths", "batch_size")}
    return {"passkey": result, "passkey_config": config}


def vocab_extend(args) -> int:
    """`cptrain vocab extend --model M --corpus F... --add N --out DIR`: an extended tokenizer and the
    model with grown embeddings, as an HF folder; a report of fertility before and after, and of how a
    reference sample of the base language (--keep files, or a built-in English sample) tokenizes now."""
    import tempfile

    from ..data_pipeline.vocab import (extend_tokenizer, fertility, piece_ids, read_corpus, reference_sample,
                                       tokenization_change)
    from ..model.hf import save_hf_dir
    from ..model.vocab import extend_embeddings
    from ..trainer.checkpoint import load_full_weights
    from ..trainer.evaluate import tokenizer_for, write_json

    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} exists; pick a new --out (nothing is written over)")
    tokenizer = tokenizer_for(args.model, args.tokenizer)
    cfg, state = load_full_weights(args.model)
    reference = reference_sample(args.keep, args.protect_reference)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent if out.parent.exists() else None))
    try:  # everything is written in a temporary folder, renamed to OUT once complete
        ext = extend_tokenizer(tokenizer, args.corpus, args.add, work, protect=reference.texts if reference.protected else [])
        texts = read_corpus(args.corpus)
        new_cfg, new_state = extend_embeddings(cfg, state, ext.first_id, piece_ids(ext, tokenizer, work), args.init,
                                               args.pad_multiple)
        save_hf_dir(new_cfg, new_state, work)
        report = {"model": str(args.model), "tokenizer": str(tokenizer), "kind": ext.kind, "added": len(ext.pieces),
                  "requested": args.add, "first_new_id": ext.first_id, "tokenizer_size": ext.first_id + len(ext.pieces),
                  "embedding_rows_before": cfg.vocab_size, "embedding_rows": new_cfg.vocab_size, "init": args.init,
                  "fertility_before": fertility(tokenizer, texts), "fertility_after": fertility(work, texts),
                  "corpus_chars": sum(map(len, texts)), "examples": ext.pieces[:20]}
        lines = []
        for key, sample in (("reference", reference), ("held_out", reference.held_out)):
            if sample is not None:
                change = tokenization_change(ext, tokenizer, work, sample.texts)
                report[key] = {"source": sample.source, "protected": sample.protected, **change.summary()}
                unguarded = key == "reference" and not sample.protected and change.words_changed
                hint = "; --protect-reference keeps it as it was" if unguarded else ""
                lines.append(f"{sample.source}{' (protected)' if sample.protected else ''}: {change.describe()}{hint}")
        write_json(work / "vocab_extension.json", report)
        out.parent.mkdir(parents=True, exist_ok=True)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        write_json(args.json, report)
    cut = 1 - report["fertility_after"] / report["fertility_before"]
    print(f"added {report['added']:,} tokens (ids {ext.first_id:,}-{report['tokenizer_size'] - 1:,}); embeddings "
          f"{cfg.vocab_size:,} -> {new_cfg.vocab_size:,} rows; tokens per character on the corpus "
          f"{report['fertility_before']:.4f} -> {report['fertility_after']:.4f} ({cut:.1%} fewer); wrote {out}")
    print("\n".join(lines))
    return 0


def upcycle(args) -> int:
    """`cptrain upcycle MODEL --experts E --top-k K [--drop-fraction r] [--family F] --out DIR`: a dense model
    as a mixture of experts (HF folder, its tokenizer and upcycle.json beside the weights)."""
    import tempfile

    from ..model.config import param_counts
    from ..model.hf import copy_tokenizer, save_hf_dir
    from ..model.upcycle import upcycle as upcycle_model
    from ..trainer.checkpoint import load_full_weights
    from ..trainer.evaluate import tokenizer_for, write_json

    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} exists; pick a new --out (nothing is written over)")
    cfg, state = load_full_weights(args.model)
    moe, moe_state = upcycle_model(cfg, state, args.experts, args.top_k, args.drop_fraction, args.family, args.seed)
    total, active = param_counts(moe)[0], param_counts(moe, active=True)[0]
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent if out.parent.exists() else None))
    try:  # written in a temporary folder, renamed to OUT once complete
        save_hf_dir(moe, moe_state, work)
        try:
            copy_tokenizer(tokenizer_for(args.model, args.tokenizer), work)
        except UserError:
            pass  # no tokenizer found: `cptrain eval --tokenizer` names it then
        write_json(work / "upcycle.json", {"model": str(args.model), "from_family": cfg.family, "family": moe.family,
                                           "experts": args.experts, "top_k": args.top_k, "drop_fraction": args.drop_fraction,
                                           "seed": args.seed, "params": total, "params_active": active})
        out.parent.mkdir(parents=True, exist_ok=True)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"upcycled {args.model} ({cfg.family}, {param_counts(cfg)[0] / 1e6:,.1f}M parameters) into {moe.family}: "
          f"{args.experts} experts, top {args.top_k}, {args.drop_fraction:.0%} of each expert's units re-initialized; "
          f"{total / 1e6:,.1f}M parameters, {active / 1e6:,.1f}M active per token; wrote {out}; continue it with "
          f"--model.init_from={out}")
    return 0


def schedule_plot(args) -> int:
    """`cptrain schedule plot CONFIG.yaml --out FILE.png`."""
    from ..trainer.analysis.report import plot_schedule
    from ..trainer.config import load_config
    from ..trainer.schedule import build_schedule

    cfg = load_config(args.config, getattr(args, "overrides", None) or [])
    schedule = build_schedule(cfg.schedule, cfg.train.max_tokens, cfg.train.global_batch_tokens)
    path = plot_schedule(schedule, args.out)
    for name, t0, t1, lr0, lr1 in schedule.describe():
        print(f"{name:<20} tokens {t0:>14,} -> {t1:>14,}   lr {lr0:.3g} -> {lr1:.3g}")
    print(f"wrote {path}")
    return 0


def hf_to_cptrain(args) -> int:
    """`cptrain convert hf-to-cptrain SRC OUT`: an HF folder -> our weights + its tokenizer files."""
    from ..model.hf import WEIGHTS_FILE, CONFIG_FILE, copy_tokenizer, load_hf_dir, save_weights

    src, out = Path(args.src), Path(args.out)
    cfg, sd = load_hf_dir(src)
    save_weights(out, cfg, sd)
    copied = copy_tokenizer(src, out)
    n_params = sum(t.numel() for t in sd.values())
    print(f"wrote {out / WEIGHTS_FILE} and {CONFIG_FILE} ({n_params / 1e6:.1f}M parameters, "
          f"{next(iter(sd.values())).dtype}) from {src}; tokenizer files: {', '.join(copied) or 'none found'}")
    return 0


def cptrain_to_hf(args) -> int:
    """`cptrain convert cptrain-to-hf CKPT OUT [--dtype D]`: any engine's checkpoint -> an HF folder."""
    import torch

    from ..model.hf import save_hf_dir
    from ..trainer.checkpoint import is_hf_folder, load_full_weights, resolve_checkpoint
    from ..trainer.moe import exported_bias_note

    cfg, state = load_full_weights(args.src)
    if cfg.moe_router != "softmax":
        raise UserError(f"{args.src}: its routers score by {cfg.moe_router} (model.moe_router), which a {cfg.family} HF "
                        "checkpoint cannot express (transformers routes by softmax); keep it as a cptrain checkpoint")
    save_hf_dir(cfg, state, Path(args.out), dtype=getattr(torch, args.dtype))
    print(f"wrote HF folder {args.out} ({args.dtype}) from {args.src}")
    note = None if is_hf_folder(args.src) else exported_bias_note(resolve_checkpoint(args.src))
    if note:
        print(note)
    return 0
