"""Where a training step's GPU time goes, told the same way for cptrain and the peer trainers
(bench/bench_mfu.py --profile, bench/bench_peers.py profile=1): torch.profiler over a few steps,
kernel time grouped by what the kernel does, the GPU's busy time against the step's wall time (the
host's share: a GPU that waits for the host is idle for the difference), and the top kernels."""
from __future__ import annotations

import re
import time

# First match wins: attention before matmul (FlashAttention's kernels are CUTLASS kernels too), the
# loss, optimizer and FP8 scaling before the compiled (triton_) kernels they may be fused into.
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("loss", ("logsumexp", "cross_entropy", "nll_loss", "log_softmax", "prepare_softmax")),
    ("optimizer/clipping", ("adam", "multi_tensor", "muon")),
    ("fp8 scaling", ("amax", "float8", "fp8")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "triton_tem")),
    ("fused elementwise/norm (compiled)", ("triton_",)),
    ("cast/copy", ("copy", "cast", "convert")),
    ("communication", ("nccl", "all_reduce", "allgather", "reduce_scatter")),
    ("other elementwise/reduction", ("elementwise", "reduce", "vectorized", "fill", "index", "scatter", "gather")),
)
ONLY_CAST = re.compile(r"^triton_\w+?_fused__to_copy_\d+$")  # a compiled kernel that only casts


def category(name: str) -> str:
    low = name.lower()
    if ONLY_CAST.match(low):
        return "cast/copy"
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


def profile_text(step, sync, steps: int = 3, top: int = 40) -> str:
    """Run `step()` `steps` times under torch.profiler (after the caller's warm-up) and return the
    report: per-category kernel ms per step and share, GPU busy vs wall ms per step, top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) * 1000 / steps
    averages = prof.key_averages()
    # GPU-side spans of record_function ("Optimizer.step#AdamW.step", FSDP's) cover kernels counted already
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    per_cat: dict[str, float] = {}
    for e in kernels:
        per_cat[category(e.key)] = per_cat.get(category(e.key), 0.0) + e.self_device_time_total / 1000 / steps
    busy = sum(per_cat.values())
    lines = [f"wall {wall:.1f} ms/step (under the profiler), GPU busy {busy:.1f} ms/step, idle {max(wall - busy, 0):.1f}",
             f"{'category':36} {'ms/step':>8} {'share':>6}"]
    for cat, ms in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"{cat:36} {ms:8.1f} {100 * ms / busy:5.1f}%")
    lines.append(f"\ntop kernels (ms/step, calls/step, category):")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        lines.append(f"{e.self_device_time_total / 1000 / steps:8.2f} {e.count / steps:6.1f}  {category(e.key):24} {e.key[:110]}")
    return "\n".join(lines)
