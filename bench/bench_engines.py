"""Throughput of the engines: a preset at seq 2048 (bf16 on GPU) under the local engine, ZeRO-2,
ZeRO-3 (also with optimizer offload) and FSDP2 on 1 and N GPUs, on synthetic tokens. Prints tokens/s
per GPU, MFU, peak memory and the scaling efficiency (tokens/s per GPU at N GPUs over that at 1), and
writes $OUT/bench_engines.json.

    python bench/bench_engines.py --preset 1B --gpus 1,2 --micro-batch 4
    python bench/bench_engines.py --preset 8B --gpus 1 --engines zero3_offload,fsdp2 --ac --set=--train.fp8=tensorwise
    python bench/bench_engines.py --preset smollm2-135m --gpus 1 --engines local,fsdp2,fsdp2@fsdp.reshard_after_forward=false --profile

The parent starts one `torchrun --nproc_per_node N` per GPU count; each worker builds the real
engines one after another (the loop's build path: meta model -> engine -> init) and times
forward+backward+step on the same micro-batches. An engine may carry config overrides of its own
after `@` (`zero2@deepspeed.extra.zero_optimization.overlap_comm=false`). Each row also splits a
step into forward+backward and the optimizer step (timed apart, with a device sync between them);
`--profile` adds a kernel and host-op profile of two steps per engine: what each engine costs beyond
the local one.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ENGINES = {"local": ["--train.engine=local"],
           "zero2": ["--train.engine=deepspeed", "--deepspeed.zero_stage=2"],
           "zero3": ["--train.engine=deepspeed", "--deepspeed.zero_stage=3"],
           "zero3_offload": ["--train.engine=deepspeed", "--deepspeed.zero_stage=3", "--deepspeed.offload_optimizer=true"],
           "fsdp2": ["--train.engine=fsdp2"],
           "fsdp2_offload": ["--train.engine=fsdp2", "--fsdp.cpu_offload=true"]}


def _config(args, spec: str, world: int):
    from cptrain.trainer.config import load_config

    engine, *own = spec.split("@")
    tokens = args.micro_batch * args.seq_len * world  # one micro-batch per rank per step: no accumulation
    return load_config(None, [f"--model.preset={args.preset}", f"--model.max_seq_len={max(args.seq_len, 64)}",
                              f"--data.seq_len={args.seq_len}", f"--train.micro_batch_size={args.micro_batch}",
                              f"--train.global_batch_tokens={tokens}", f"--train.max_tokens={tokens}",
                              f"--train.compile={args.compile}", f"--train.activation_checkpointing={args.ac}",
                              f"--deepspeed.optimizer={args.ds_optimizer}", f"--train.loss_chunk_tokens={args.ce}",
                              *ENGINES[engine], *args.set, *(f"--{o}" for o in own)])


def _time_engine(args, engine: str, ctx) -> dict:
    import torch
    import torch.distributed as dist

    from cptrain.model.config import flops_per_token, hardware_flops_per_token
    from cptrain.trainer.engines import build_engine
    from cptrain.trainer.engines.spec import engine_spec
    from cptrain.trainer.loss import lm_loss
    from cptrain.trainer.metrics import device_peak_tflops

    cfg = _config(args, engine, ctx.world_size)
    arch = cfg.model.arch
    t_build = time.perf_counter()
    eng = build_engine(engine_spec(cfg, ctx), arch)
    build_s = time.perf_counter() - t_build
    gen = torch.Generator().manual_seed(ctx.rank)
    batch = {"tokens": torch.randint(0, arch.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen).to(ctx.device)}
    scale = ctx.world_size / cfg.train.global_batch_tokens
    loss_fn = lambda m, b: lm_loss(m, b, scale, cfg.train.loss_chunk_tokens)  # noqa: E731
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync(), dist.barrier()
            t0 = time.perf_counter()
        eng.forward_backward(batch, loss_fn, sync=True)
        eng.step(1e-4)
    sync(), dist.barrier()
    seconds = (time.perf_counter() - t0) / args.steps
    phases = {"fwd_bwd_s": 0.0, "opt_step_s": 0.0}
    for _ in range(3):  # the same steps with a sync between the phases: which phase holds the time
        t1 = time.perf_counter()
        eng.forward_backward(batch, loss_fn, sync=True)
        sync()
        t2 = time.perf_counter()
        eng.step(1e-4)
        sync()
        phases["fwd_bwd_s"] += (t2 - t1) / 3
        phases["opt_step_s"] += (time.perf_counter() - t2) / 3
    if args.profile and ctx.is_main:
        _profile(f"{args.preset}_{engine}", lambda: (eng.forward_backward(batch, loss_fn, sync=True), eng.step(1e-4)), sync)
    tps = args.micro_batch * args.seq_len / seconds
    peak = device_peak_tflops(ctx.device, 0.0) * 1e12
    row = {"engine": engine, "gpus": ctx.world_size, "preset": args.preset, "seq_len": args.seq_len,
           "micro_batch": args.micro_batch, "build_s": build_s, "step_s": seconds, **phases, "tokens_per_s_per_gpu": tps,
           "mfu": flops_per_token(arch, args.seq_len) * tps / peak if peak else None,
           "hfu": hardware_flops_per_token(arch, args.seq_len, args.ac) * tps / peak if peak else None,
           "fp8": cfg.train.fp8, "set": args.set,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else None}
    del eng
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _profile(name: str, step, sync) -> None:
    """Two steps under torch.profiler: the device's busy time against the wall time (below 1: the
    host is what the device waits for), the kernels by device time and the host ops by their own time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        sync()
        wall = time.perf_counter() - t0
    table = prof.key_averages()
    busy = sum(e.self_device_time_total for e in table) / 1e6
    text = (f"## profile {name}: wall {wall / 2 * 1e3:.1f} ms/step, device busy {busy / 2 * 1e3:.1f} ms/step "
            f"(streams summed)\n"
            + table.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60) + "\n"
            + table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    print(text, flush=True)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / f"profile_{name.replace('@', '_').replace('=', '-')}.txt").write_text(text)


def worker(args) -> None:
    import torch.distributed as dist

    from cptrain.trainer.engines.layout import init_distributed
    from cptrain.trainer.engines.fsdp import ensure_process_group

    import torch

    ctx = init_distributed("auto")
    ensure_process_group(ctx)  # one process: the sharded engines still need a group
    rows = []
    for engine in args.engines.split(","):
        try:
            rows.append(_time_engine(args, engine, ctx))
        except torch.OutOfMemoryError:  # a failed variant is a result to report, not a reason to lose the others
            rows.append({"engine": engine, "gpus": ctx.world_size, "preset": args.preset, "error": "OOM"})
            gc.collect()
            torch.cuda.empty_cache()
        if ctx.is_main:
            Path(args.worker_out).write_text(json.dumps(rows))  # after each engine: a timeout keeps what was measured
            if os.environ.get("OUT"):
                with open(Path(os.environ["OUT"]) / "bench_engines.jsonl", "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
            print(json.dumps(rows[-1]), flush=True)
    dist.destroy_process_group()


def table(rows: list[dict]) -> str:
    base = {r["engine"]: r["tokens_per_s_per_gpu"] for r in rows if r["gpus"] == 1 and "error" not in r}
    lines = ["| engine | GPUs | tokens/s per GPU | MFU | peak mem GiB | step s | fwd+bwd s | opt step s | scaling efficiency |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['gpus']} | {r['error']} | | | | | | |")
            continue
        r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / base[r["engine"]] if r["engine"] in base else None
        lines.append(f"| {r['engine']} | {r['gpus']} | {r['tokens_per_s_per_gpu']:,.0f} | {fmt(r['mfu'], '.1%')} | "
                     f"{fmt(r['peak_mem_gib'], '.1f')} | {r['step_s']:.3f} | {r['fwd_bwd_s']:.3f} | {r['opt_step_s']:.3f} | "
                     f"{fmt(r['scaling_efficiency'], '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="350M")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--gpus", default="1,2", help="comma-separated process counts, one torchrun each")
    p.add_argument("--engines", default="zero2,zero3,fsdp2",
                   help=f"comma-separated, of {', '.join(ENGINES)}; each may add @section.key=value overrides")
    p.add_argument("--profile", action="store_true", help="print a kernel and host-op profile of two steps per engine")
    p.add_argument("--steps", type=int, default=10, help="timed steps per engine")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--ac", action="store_true", help="activation checkpointing per block")
    p.add_argument("--ds-optimizer", choices=["torch", "deepspeed"], default="torch",
                   help="torch AdamW (the one FSDP2 uses) or DeepSpeed's fused Adam (JIT-built)")
    p.add_argument("--ce", type=int, default=0, help="train.loss_chunk_tokens (the fused chunked loss; ZeRO-3 refuses it)")
    p.add_argument("--set", action="append", default=[], help="a config override for every engine, e.g. --set=--train.fp8=tensorwise")
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_out:
        worker(args)
        return 0
    rows = []
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in vars(args).items()
             if k not in ("gpus", "worker_out", "set") and v is not False] + [f"--set={o}" for o in args.set]
    for n in [int(g) for g in args.gpus.split(",")]:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__,
                   *flags, f"--worker-out={f.name}"]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            rows += json.loads(Path(f.name).read_text())
    print(table(rows))
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "bench_engines.json"
        out.write_text(json.dumps(rows, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
