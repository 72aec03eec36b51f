"""The timing loop every peer trainer runs under, in its own process (bench/bench_peers.py starts one
process per row): build the peer's step from the row's spec, run the warm-up steps (compilation
happens there), then the timed steps, and print ONE line `PEER_ROW {json}`. An exception, an
out-of-memory or the SIGTERM of a time limit becomes the same line with "error" instead of numbers,
so the caller always gets a row.

The spec (JSON, argv[1]) is what bench_peers.py writes: model (preset name), shape (vocab_size, dim,
n_layers, n_heads, n_kv_heads, ffn_dim, norm_eps, rope_theta, rope_scaling, tie_embeddings; of a
mixture of experts also head_dim, qk_norm (none|head|full), experts, top_k, expert_dim, norm_topk,
router (softmax|sigmoid)), seq, mb, fp8 (off|tensorwise|rowwise), ac (full activation checkpointing
0/1), bf16 (bf16 parameters and optimizer state 0/1), compile (0/1), loss and attn (the peer's own
names; "" = its default), layers (the depth cut, already in shape's n_layers), experts (grouped|loop|""),
steps, warmup, device (cuda|cpu), profile (0/1: after the timed steps, print bench/kernel_profile.py's
report of 3 more steps).

A build function returns (step, info): `step()` runs one optimizer step on random tokens, `info`
holds version, options (the exact settings, one string), params (the peer's own count) and
optionally `after`, a function called once after the timed steps that returns extra numbers (loss).
"""
from __future__ import annotations

import gc
import json
import signal
import sys
import time
import traceback
from pathlib import Path

MARK = "PEER_ROW "


def _on_sigterm(signum, frame):
    raise TimeoutError(f"stopped by signal {signum} (the row's time limit)")


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"
    if type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower():
        return "OOM: " + text
    return text


def _timed(spec: dict, step, device) -> dict:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out = {}
    gc.collect()
    gc.disable()  # as the peers' own loops do (both collect on a schedule, not in the hot path)
    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):
        step()
    sync()
    out["warmup_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    sync()
    dt = time.perf_counter() - t0
    gc.enable()
    out["tokens_per_s"] = round(spec["mb"] * spec["seq"] * spec["steps"] / dt)
    if spec.get("profile"):
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/, for its kernel_profile
        from kernel_profile import profile_text

        print(profile_text(step, sync), flush=True)
    out["step_ms"] = round(1000 * dt / spec["steps"], 1)
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return out


def run(impl: str, build) -> int:
    """Build, time and print the row of one peer run; always exits 0 after printing the row."""
    spec = json.loads(sys.argv[1])
    signal.signal(signal.SIGTERM, _on_sigterm)
    row = {"impl": impl}
    start = time.perf_counter()
    try:
        import torch

        device = torch.device(spec["device"])
        row["torch"] = torch.__version__
        row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step, info = build(spec, device)
        after = info.pop("after", None)
        row.update(info)
        row["setup_s"] = round(time.perf_counter() - start, 1)
        row.update(_timed(spec, step, device))
        if after is not None:
            row.update(after())
    except BaseException as e:  # noqa: BLE001 -- a failed run is a row, not a lost call
        traceback.print_exc(file=sys.stderr)
        row["error"] = _error_text(e)
        for key in ("tokens_per_s", "step_ms"):
            row.pop(key, None)
    row["wall_s"] = round(time.perf_counter() - start, 1)
    print(MARK + json.dumps(row), flush=True)
    _shutdown()
    return 0


def _shutdown() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- the row is printed; nothing left to report
        pass


def single_process_env() -> None:
    """The environment torchrun gives one process (a free port for its store), for peers that start
    torch.distributed themselves."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def random_tokens(spec: dict, n: int, generator_seed: int = 1234):
    """n batches of random token ids [mb, seq + 1] on the CPU (inputs are [:, :-1], labels [:, 1:])."""
    import torch

    gen = torch.Generator().manual_seed(generator_seed)
    return [torch.randint(0, spec["shape"]["vocab_size"], (spec["mb"], spec["seq"] + 1), generator=gen)
            for _ in range(n)]
