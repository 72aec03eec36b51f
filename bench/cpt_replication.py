"""A small replication of the continual-pretraining papers' direction on CPU (docs/continual.md).

    python bench/cpt_replication.py [--out runs/cpt_replication] [--jobs 2]

Pretrains the demo's tiny Llama (dim 128, 4 layers) once on English (Austen) with an infinite
schedule (warmup, cooldown, open-ended constant), anneals a branch of it to the floor (the
"released" model), then continues on a shifted domain (Spanish Reina-Valera, English tokenizer)
six times: (a) from the annealed model with a rewarm to the pretraining peak and a cosine decay
(Gupta et al. 2023), (b) from the constant-phase checkpoint at the constant LR, then a short anneal
(Ibrahim et al. 2024) - each with 0%, 5% and 25% English replay. Writes OUT/results.md and .json
(old/new-domain validation losses at the start, after the rewarm, at the end) and OUT/curves.png.
`--jobs 2` runs two continuations at a time, one thread each (the same two cores).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import time
from pathlib import Path


STEP = 4096                 # tokens per optimizer step: 16 sequences of 256
PRETRAIN_STEPS, ANNEAL_STEPS, CONT_STEPS, REWARM_STEPS = 64, 8, 24, 4
PEAK, CONSTANT = 3e-3, 0.5  # pretraining peak LR; the infinite schedule's constant level (fraction of peak)
REPLAY = (0.0, 0.05, 0.25)
MERGE_EVERY, EMA_DECAY = 2, 0.9  # constant-phase checkpoints for the merges; the weight EMA's decay
EVAL_EVERY = REWARM_STEPS * STEP  # so one evaluation falls right after the rewarm


def _common(run_dir: Path, english: Path, device: str) -> list[str]:
    # fp32 everywhere, so a GPU run computes what the CPU run does
    return [f"--run_dir={run_dir}", f"--train.device={device}", "--train.precision=fp32", f"--data.domains=[{{name: english, path: {english}}}]",
            f"--train.global_batch_tokens={STEP}", "--train.micro_batch_size=16", "--log.progress=false",
            f"--schedule.lr={PEAK}", "--schedule.min_lr_ratio=0.1", "--eval.max_samples=24", "--checkpoint.keep_last=1",
            "--checkpoint.interval_tokens=0"]


def pretrain(out: Path, english: Path, device: str) -> tuple[Path, Path]:
    """The infinite-schedule pretraining run and its anneal branch (lengths in tokens, so the
    open-ended constant phase can be branched at its last checkpoint)."""
    from cptrain.trainer.config import load_config
    from cptrain.trainer.branch import prepare_branch
    from cptrain.launch.demo import CONFIG
    from cptrain.trainer.loop import run

    main_dir, branch = out / "pretrain", out / "pretrain-annealed"
    if not (main_dir / "checkpoints" / "latest").is_file():
        # Checkpoints every MERGE_EVERY steps and a weight EMA, for the merges of `released`;
        # neither changes the training itself.
        run(load_config(CONFIG, [*_common(main_dir, english, device), f"--train.max_tokens={PRETRAIN_STEPS * STEP}",
                                 "--schedule.kind=infinite", f"--schedule.warmup_tokens={4 * STEP}",
                                 f"--schedule.cooldown_tokens={12 * STEP}", f"--schedule.constant_ratio={CONSTANT}",
                                 "--schedule.decay_fraction=0", f"--eval.interval_tokens={16 * STEP}",
                                 f"--checkpoint.interval_tokens={MERGE_EVERY * STEP}", "--checkpoint.keep_last=8",
                                 f"--train.ema_decay={EMA_DECAY}"]))
    if not (branch / "checkpoints" / f"step-{PRETRAIN_STEPS + ANNEAL_STEPS:08d}").is_dir():
        run(prepare_branch(main_dir, branch, ANNEAL_STEPS * STEP, "linear"), resume=True)
    return main_dir, branch


def released(out: Path, main_dir: Path, annealed_dir: Path, english: Path, device: str) -> list[dict]:
    """The model to release from the end of the constant phase, each way: the raw constant-LR
    checkpoint, its anneal branch (ANNEAL_STEPS more steps of training), merges of the constant
    phase's last checkpoints (no training; WSM, Tian et al. 2025, and plain averaging) and the
    weight EMA. English validation loss over the whole split."""
    import torch

    from cptrain.launch.cli import main as cli
    from cptrain.trainer.evaluate import load_model, split_loss

    last = main_dir / "checkpoints" / f"step-{PRETRAIN_STEPS:08d}"
    rows = [("raw constant-LR checkpoint", 0, last),
            (f"anneal branch, linear over {ANNEAL_STEPS} steps", ANNEAL_STEPS,
             annealed_dir / "checkpoints" / f"step-{PRETRAIN_STEPS + ANNEAL_STEPS:08d}")]
    for k, how in ((4, []), (8, []), (8, ["--shape", "linear"]), (8, ["--shape", "1-sqrt"]), (1, ["--ema"])):
        name = f"merge-last{k}{''.join(how).replace('--', '-')}"
        if not (out / name).is_dir():
            assert cli(["merge", str(main_dir), "--last", str(k), *how, "--out", str(out / name)]) == 0
        label = (f"EMA of the weights (decay {EMA_DECAY})" if how == ["--ema"] else
                 f"merge of the last {k} checkpoints (over {(k - 1) * MERGE_EVERY} steps), "
                 f"{how[1] if how else 'uniform'}")
        rows.append((label, 0, out / name))
    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    return [{"model": label, "extra_steps": extra, "english": split_loss(load_model(path, dev), english)["loss"]}
            for label, extra, path in rows]


def released_table(rows: list) -> str:
    raw = rows[0]["english"]
    lines = ["| released model | extra training steps | EN val loss | vs raw |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['extra_steps']} | {r['english']:.4f} | {r['english'] - raw:+.4f} |" for r in rows]
    return "\n".join(lines) + "\n"


def continuation(job: dict) -> dict:
    """One continual run (in a worker process): returns its name and per-domain validation curves."""
    import torch

    from cptrain.trainer.config import load_config
    from cptrain.launch.demo import CONFIG
    from cptrain.trainer.loop import run

    torch.set_num_threads(job["threads"])
    run_dir = Path(job["run_dir"])
    english, spanish = job["english"], job["spanish"]  # runs side by side read the same folders
    if job["arm"] == "rewarm":  # Gupta et al. 2023: rewarm to the old peak, cosine to the floor
        sched = ["--schedule.kind=rewarm", f"--schedule.warmup_tokens={REWARM_STEPS * STEP}", "--schedule.decay_shape=cosine"]
    else:  # Ibrahim et al. 2024: stay at the constant LR, anneal at the end
        sched = ["--schedule.kind=phases", f"--schedule.phases=[{{shape: constant, end: {CONSTANT}, name: constant}}, "
                 f"{{shape: linear, length_tokens: {ANNEAL_STEPS * STEP}, name: anneal}}]"]
    data = [f"--data.domains=[{{name: spanish, path: {spanish}}}]"]
    if job["replay"]:
        data += [f"--data.replay=[{{name: english, path: {english}}}]", f"--data.replay_fraction={job['replay']}"]
    else:
        data += [f"--data.val_domains=[{{name: english, path: {english}}}]"]
    if not (run_dir / "forgetting.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        run(load_config(CONFIG, [*_common(run_dir, english, job["device"]), *data, *sched, f"--model.init_from={job['init_from']}",
                                 "--model.load=weights+optimizer", f"--train.max_tokens={CONT_STEPS * STEP}",
                                 f"--eval.interval_tokens={EVAL_EVERY}", "--continual.old_domains=[english]",
                                 "--continual.new_domains=[spanish]"]))
        (run_dir / "timing.json").write_text(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": _cpu_seconds() - cpu0}))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curves = {d: [(r["tokens"], r[f"val/{d}"]) for r in rows if f"val/{d}" in r] for d in ("english", "spanish")}
    return {"name": run_dir.name, "arm": job["arm"], "replay": job["replay"], "curves": curves,
            "lrs": [(r["tokens"], r["lr"]) for r in rows if "lr" in r], **json.loads((run_dir / "timing.json").read_text())}


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _at(curve: list, tokens: int) -> float:
    return dict(curve)[tokens]


def table(results: list, annealed: dict) -> str:
    after, end = REWARM_STEPS * STEP, CONT_STEPS * STEP
    lines = [f"Validation loss (nats/token). Start = step 0 of the continuation; after rewarm = {after:,} tokens "
             f"({REWARM_STEPS} steps); end = {end:,} tokens. Forgetting = English end - start; the annealed "
             f"pretrained model scores English {annealed['english']:.3f}, Spanish {annealed['spanish']:.3f}.", "",
             "| schedule | replay | EN start | EN after rewarm | EN worst | EN end | forgetting | ES start | ES after rewarm | ES end |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        en, es = r["curves"]["english"], r["curves"]["spanish"]
        worst = max(v for t, v in en if t > 0)
        lines.append(f"| {'rewarm + cosine' if r['arm'] == 'rewarm' else 'infinite: constant + anneal'} | "
                     f"{r['replay']:.0%} | {_at(en, 0):.3f} | {_at(en, after):.3f} | {worst:.3f} | {_at(en, end):.3f} | "
                     f"{_at(en, end) - _at(en, 0):+.3f} | {_at(es, 0):.3f} | {_at(es, after):.3f} | {_at(es, end):.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: list, path: Path) -> None:
    from cptrain.trainer.analysis.report import plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, dom in zip(axes, ("english", "spanish")):
        for r in results:
            xs, ys = zip(*r["curves"][dom])
            ax.plot(xs, ys, marker="o", ms=3, ls="-" if r["arm"] == "rewarm" else "--", label=f"{r['arm']} {r['replay']:.0%}")
        ax.set_title(f"val/{dom} ({'old' if dom == 'english' else 'new'} domain)")
        ax.set_xlabel("continuation tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from cptrain.launch.demo import prepare

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/cpt_replication")
    ap.add_argument("--jobs", type=int, default=1, help="continuations run at a time (threads are split among them)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    ap.add_argument("--released-only", action="store_true",
                    help="pretraining, its anneal branch and the merges only (no continuations)")
    args = ap.parse_args()
    out = Path(args.out)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    english = prepare(out, "english", "austen.txt", ["--train-tokenizer", "4000"])
    spanish = prepare(out, "spanish", "rv1909_nt.txt", ["--tokenizer", str(english / "tokenizer.model")])
    main_dir, annealed_dir = pretrain(out, english, args.device)
    released_rows = released(out, main_dir, annealed_dir, english, args.device)
    print(released_table(released_rows))
    pre_cpu = _cpu_seconds() - cpu0
    if args.released_only:
        (out / "released.json").write_text(json.dumps(released_rows, indent=1))
        return
    threads = max(1, 2 // args.jobs)
    jobs = [{"arm": arm, "replay": rf, "threads": threads, "device": args.device, "run_dir": str(out / f"{arm}-replay{round(rf * 100)}"),
             "english": str(english), "spanish": str(spanish), "init_from": str(annealed_dir if arm == "rewarm" else main_dir)}
            for arm in ("rewarm", "infinite") for rf in REPLAY]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(continuation, jobs)
    annealed_rows = [json.loads(line) for line in (annealed_dir / "metrics.jsonl").read_text().splitlines()]
    annealed = {"english": [r["val/english"] for r in annealed_rows if "val/english" in r][-1],
                "spanish": _at(results[0]["curves"]["spanish"], 0)}
    text = table(results, annealed) + "\n" + released_table(released_rows)
    cpu = pre_cpu + sum(r["cpu_s"] for r in results)
    import torch

    device = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    text += (f"\nDevice {device}, fp32, {args.jobs} continuation(s) at a time, {time.strftime('%Y-%m-%d')}; wall {time.perf_counter() - t0:.0f} s, "
             f"CPU {cpu:.0f} s (pretraining and anneal {pre_cpu:.0f} s, continuations {cpu - pre_cpu:.0f} s).\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"annealed_pretrained": annealed, "released": released_rows,
                                                  "runs": results}, indent=1))
    plot(results, out / "curves.png")
    print(text + f"wrote {out / 'results.md'}, results.json and curves.png")


if __name__ == "__main__":
    main()
