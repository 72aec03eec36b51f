"""Checkpoint cost at a given model size: synchronous save, asynchronous save (the training stall and
the time until the checkpoint is published), and resume (verification + load), for the local and
FSDP2 engines on one device. Random tokens; the model and optimizer state are the real ones.

    python3 bench/bench_checkpoint.py --preset 1B --engines local,fsdp2 --out results.jsonl

Prints a table; each row is also appended to --out as a JSON line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cptrain.trainer import checkpoint as ckpt
from cptrain.trainer.config import load_config
from cptrain.trainer.engines import build_engine
from cptrain.trainer.engines.layout import init_distributed
from cptrain.trainer.engines.spec import engine_spec
from cptrain.trainer.loss import lm_loss


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(engine_name: str, args, root: Path) -> dict:
    seq, mb = args.seq_len, args.micro_batch
    cfg = load_config(None, [f"--model.preset={args.preset}", f"--data.seq_len={seq}", f"--train.micro_batch_size={mb}",
                             f"--train.global_batch_tokens={seq * mb}", f"--train.engine={engine_name}",
                             "--model.attention=sdpa", "--model.doc_masking=false", f"--checkpoint.async={engine_name != 'deepspeed'}",
                             f"--run_dir={root / engine_name}"])
    ctx = init_distributed(cfg.train.device)
    engine = build_engine(engine_spec(cfg, ctx), cfg.model.arch)
    tokens = torch.randint(0, cfg.model.arch.vocab_size, (mb, seq + 1), device=ctx.device)

    def step() -> float:
        t0 = time.perf_counter()
        engine.forward_backward({"tokens": tokens}, lambda m, b: lm_loss(m, b, 1.0 / (mb * seq)), sync=True)
        engine.step(1e-5)
        _sync(ctx.device)
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up; creates the optimizer state
        step()
    base = statistics.median(step() for _ in range(5))
    row = {"preset": args.preset, "engine": engine_name, "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
           "params": sum(p.numel() for p in engine.model.parameters()), "step_s": round(base, 4)}

    def saver(async_save: bool) -> ckpt.Checkpointer:
        return ckpt.Checkpointer(root / engine_name, keep_last=2, async_save=async_save, device=ctx.device)

    sync = saver(False)
    t0 = time.perf_counter()
    folder = sync.save(1, engine, [], {"progress": {}}, {})
    row["sync_save_s"] = round(time.perf_counter() - t0, 2)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    row["checkpoint_gb"] = round(size / 1e9, 2)

    background = saver(True)
    for attempt in range(2):  # the second reuses the first's pinned buffers: the steady state
        t0 = time.perf_counter()
        background.save(2 + attempt, engine, [], {"progress": {}}, {})
        stall = time.perf_counter() - t0
        steps, published = [], None
        while published is None:
            steps.append(step())
            published = background.poll()
        total = time.perf_counter() - t0
    row.update(async_stall_s=round(stall, 2), async_steps_while_writing=len(steps),
               async_step_s=round(statistics.median(steps), 4), async_published_after_s=round(total, 2))

    t0 = time.perf_counter()
    found = ckpt.find_resume(root / engine_name, log=lambda _: None)
    row["verify_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    engine.load(found, optimizer=True)
    _sync(ctx.device)
    row["load_s"] = round(time.perf_counter() - t0, 2)
    row["hash_gb_per_s"] = round(size / 1e9 / max(row["verify_s"], 1e-9), 2)
    del engine, model
    torch.cuda.empty_cache() if ctx.device.type == "cuda" else None
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="1B")
    p.add_argument("--engines", default="local,fsdp2")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    rows = []
    for name in args.engines.split(","):
        row = measure(name, args, root)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        shutil.rmtree(root / name, ignore_errors=True)
    keys = ["engine", "checkpoint_gb", "step_s", "sync_save_s", "async_stall_s", "async_step_s", "async_published_after_s",
            "verify_s", "load_s"]
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
