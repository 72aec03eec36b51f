"""Training throughput of cptrain against the trainers users would pick instead, OLMo-core and
torchtitan, in one call on one GPU: the same shapes (a cptrain preset; each peer builds its own model
from those numbers, and the row says whether its parameter count matches), sequence length,
micro-batch, precision and optimizer (AdamW betas 0.9/0.95, wd 0.1, clipping at 1.0), random tokens.

Each row runs in its own process under a time limit (a crash, an out-of-memory or a hang is a row
with "error", never a lost call): `ours` is bench/bench_mfu.py's `ours` path (the trainer's engine
and loss), the peers are bench/peers/*_peer.py (their own model, train module / trainer and
options; the docstrings there say which and why). MFU is taken here, by one function for every row:
tokens/s x cptrain.model.config.flops_per_token(preset, seq) / peak (989 TFLOP/s, dense bf16, also
for FP8 rows).

    python3 bench/bench_peers.py --out peers.jsonl --budget-s 520 \\
        --run ours:model=1B,mb=8 --run olmo-core:model=1B,mb=8 --run torchtitan:model=1B,mb=8
    python3 bench/bench_peers.py --out peers.jsonl --torchtitan-site 0.2.2=DIR \\
        --run ours:model=qwen3-30b-a3b,layers=8,mb=4,bf16=1 --run torchtitan:model=qwen3-30b-a3b,layers=8,mb=4,bf16=1

A run is `impl:key=value,...`, impl one of ours | olmo-core | torchtitan; keys: model (preset), seq,
mb, fp8 (off|tensorwise|rowwise), ac (full activation checkpointing 0/1), bf16 (bf16 parameters and
optimizer state 0/1), compile (0/1), loss and attn (the impl's own names; empty: its default),
keep_ends (ours with fp8: 0 converts the first and last blocks too, as the
peers do; 1, our default, keeps them in bf16), profile (1: after the timed steps, 3 more under
torch.profiler, reported the same way for every impl by bench/kernel_profile.py; the row's whole
output goes to --profile-dir), limit (seconds for the row); of a mixture of experts: layers (the
preset's first N blocks, to fit one GPU, as bench_mfu.py's key; 0: all) and experts (grouped|loop:
grouped GEMM or a loop over the experts; empty: ours `auto`, torchtitan grouped_mm on a GPU, its
loop on a CPU, where its permutation kernel, a Triton one, cannot run). `--torchtitan-site VERSION=DIR`
(repeatable, in order of preference) names folders holding one torchtitan release each: a row is tried
with the first; a release that fails (other than by memory) before it has run once is dropped and the
next tried, and the first release that runs is used for every row after.

Mixtures of experts run against torchtitan 0.2's own MoE (its Qwen3 model with `moe_enabled`,
models/moe: token-choice top-k router, dropless, experts through torch._grouped_mm; 0.3's MoE is not
wired here, so its rows fail over to 0.2); bench/peers/torchtitan_peer.py says which settings match
ours. It builds qwen3-30b-a3b and mixtral-8x7b exactly (params_match true), olmoe-1b-7b with q/k norm
per head where OLMoE's spans the whole projection (its Qwen3 has no other kind: params_match false,
and the row's options say so), and for CPU tiny-mixtral, or tiny-qwen3-moe cut before its dense layer
(layers=1). OLMo-core runs no MoE row: its dropless MoE (nn/moe, the one its TransformerTrainModule
trains) computes the experts with the grouped_gemm package, absent from the GPU image (without it, a
loop over the experts behind a host sync), and permutes tokens with Triton kernels only; its
torch grouped_mm MoE is the separate OLMoDDP fused stack (its own model, train module and optimizer).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cptrain.errors import UserError
from cptrain.model.config import flops_per_token, param_counts
from cptrain.model.presets import first_layers, preset

HERE = Path(__file__).resolve().parent
IMPLS = ("ours", "olmo-core", "torchtitan")
PEER_SCRIPTS = {"olmo-core": HERE / "peers" / "olmo_core_peer.py", "torchtitan": HERE / "peers" / "torchtitan_peer.py"}
DEFAULTS = {"model": "1B", "seq": 2048, "mb": 8, "fp8": "off", "ac": 0, "bf16": 0, "compile": 1, "loss": "", "attn": "",
            "keep_ends": 1, "profile": 0, "limit": 150, "layers": 0, "experts": ""}
TEXT_KEYS = ("model", "fp8", "loss", "attn", "experts")
EXPERT_KERNELS = ("", "grouped", "loop")
OLMO_CORE_MOE = ("olmo-core runs no mixture of experts here: its dropless MoE needs the grouped_gemm package (absent from "
                 "the GPU image) and Triton permutes (no CPU path); run the MoE shapes against torchtitan")
# Ours: the fused chunked loss, FlashAttention (FA4 when installed, else torch's FA2 varlen kernel),
# one document per row, i.e. plain causal attention like the peers' runs; the loss chunk of the gpu configs.
OURS_OPTIONS = {"ce": 8192, "attn": "flash_attn", "doc": 0}
MARK = "PEER_ROW "
KEEP = ("OOM", "recipes only")  # errors that do not count against a torchtitan release: memory, a recipe it lacks


def parse_run(text: str) -> dict:
    impl, _, rest = text.partition(":")
    if impl not in IMPLS:
        raise UserError(f"--run {text!r}: impl must be one of {', '.join(IMPLS)}")
    run = dict(DEFAULTS, impl=impl)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in DEFAULTS:
            raise UserError(f"--run {text!r}: unknown key {key!r}; keys: {', '.join(DEFAULTS)}")
        run[key] = value if key in TEXT_KEYS else int(value)
    moe = "experts" in shape(run["model"], run["layers"])  # a preset the peers can build, before any run starts
    if run["experts"] not in EXPERT_KERNELS or (run["experts"] and not moe):
        raise UserError(f"--run {text!r}: experts= is grouped or loop, for a mixture of experts only")
    if moe and impl == "olmo-core":
        raise UserError(f"--run {text!r}: {OLMO_CORE_MOE}")
    return run


def architecture(model: str, layers: int = 0):
    """The preset, cut to its first `layers` blocks (an MoE shape cut down to one GPU keeps its layers' shape)."""
    a = preset(model)
    if not layers:
        return a
    if not a.n_experts:
        raise UserError(f"layers={layers}: cuts a mixture of experts' depth to fit one GPU; {model!r} is dense (drop the key)")
    if not 0 < layers <= a.n_layers:
        raise UserError(f"layers={layers}: {model!r} has {a.n_layers} layers; pick 1..{a.n_layers} (0: all)")
    return first_layers(a, layers)


def shape(model: str, layers: int = 0) -> dict:
    """The numbers a peer needs to build `model` (cut to `layers` blocks): a plain Llama (the only dense
    family all three share), or a mixture of experts with Llama blocks but for q/k norm and the experts
    (what torchtitan's Qwen3 MoE builds)."""
    a = architecture(model, layers)
    out = {"vocab_size": a.vocab_size, "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads,
           "n_kv_heads": a.n_kv_heads, "ffn_dim": a.ffn_dim, "norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
           "rope_scaling": a.rope_scaling, "tie_embeddings": a.tie_embeddings}
    llama_block = (not a.qkv_bias and a.norm_placement == "pre" and not a.sliding_window and not a.layer_types
                   and a.activation == "silu" and not a.embed_scale and not a.attn_softcap and not a.final_softcap)
    if not a.n_experts:
        if not (llama_block and a.family == "llama" and a.qk_norm == "none" and not a.head_dim):
            raise UserError(f"model {model!r}: the peers are compared at plain Llama shapes (1B, 1.3B, 8B, 350M, ...) "
                            "and the MoE presets (olmoe-1b-7b, qwen3-30b-a3b, mixtral-8x7b, tiny-mixtral)")
        return out
    unlike = [what for what, differs in (
        ("its blocks are not Llama's (biases, norm placement, windows or soft-caps)", not llama_block or a.rope_scaling),
        ("a sigmoid-gated shared expert", a.moe_shared_ffn_dim),
        (f"dense layers {a.moe_dense_layers} (torchtitan's Qwen3 MoE makes every layer MoE; cut below them with layers=)",
         a.moe_dense_layers)) if differs]
    if unlike:
        raise UserError(f"model {model!r}: no peer builds this mixture of experts: {unlike[0]}")
    out.update(head_dim=a.head_size, qk_norm=a.qk_norm, experts=a.n_experts, top_k=a.moe_top_k, expert_dim=a.moe_ffn_dim,
               norm_topk=a.moe_norm_topk, router=a.moe_router)
    return out


def mfu(tokens_per_s: float, model: str, seq: int, peak_tflops: float, layers: int = 0) -> float:
    """The one MFU of every row: model FLOPs per token (as torchtitan and OLMo-core count them: 6 per
    matmul weight, the head included, plus causal attention; of a mixture of experts the active
    weights: router, top-k experts) over the dense bf16 peak."""
    return round(tokens_per_s * flops_per_token(architecture(model, layers), seq) / (peak_tflops * 1e12), 4)


def run_child(cmd: list[str], env: dict, limit: float) -> tuple[str, str, float]:
    """(stdout+stderr, "" or "timed out ...", seconds): the child's process group is ended at the limit."""
    t0 = time.perf_counter()
    out, stopped = _communicate(cmd, env, limit)
    return out, stopped, round(time.perf_counter() - t0, 1)


def _communicate(cmd: list[str], env: dict, limit: float) -> tuple[str, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        return proc.communicate(timeout=limit)[0], ""
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the child prints its row on SIGTERM
        try:
            out = proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out = proc.communicate()[0]
        return out, f"timed out after {limit:.0f} s"


def _tail(text: str, n: int = 12) -> str:
    return "\n".join(line for line in text.splitlines()[-n:])


def keep_profile(run: dict, args, output: str) -> None:
    """A profiled row's whole output (its kernel report included) into --profile-dir, one file per row."""
    if not (run["profile"] and args.profile_dir):
        return
    prec = ("bf16p" if run["bf16"] else "bf16") if run["fp8"] == "off" else "fp8" + run["fp8"]
    cut = f"-L{run['layers']}" if run["layers"] else ""
    name = f"{run['impl']}-{run['model']}{cut}-seq{run['seq']}-mb{run['mb']}-{prec}-ac{run['ac']}.txt"
    args.profile_dir.mkdir(parents=True, exist_ok=True)
    (args.profile_dir / name).write_text(output)


def ours_row(run: dict, args, limit: float) -> dict:
    opts = dict(OURS_OPTIONS, mb=run["mb"], compile=run["compile"], ac=run["ac"], bf16=run["bf16"], fp8=run["fp8"],
                keep_ends=run["keep_ends"])
    if run["attn"]:
        opts["attn"] = run["attn"]
    if preset(run["model"]).n_experts:  # bench_mfu.py's keys of a mixture of experts
        opts.update(layers=run["layers"], experts=run["experts"] or "auto")
    spec = "ours:" + ",".join(f"{k}={v}" for k, v in opts.items())
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "row.jsonl"
        cmd = [sys.executable, str(HERE / "bench_mfu.py"), "--model", run["model"], "--seq", str(run["seq"]),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
               "--run", spec, "--out", str(out_file)] + (["--profile"] if run["profile"] else [])
        output, stopped, wall = run_child(cmd, dict(os.environ), limit)
        keep_profile(run, args, output)
        rows = [json.loads(line) for line in out_file.read_text().splitlines()] if out_file.exists() else []
    if not rows:
        return {"impl": "ours", "error": stopped or "no row", "wall_s": wall, "log_tail": _tail(output)}
    r = rows[-1]
    row = {"impl": "ours", "version": "cptrain", "options": spec, "torch": r.get("torch"), "device": r.get("device"),
           "wall_s": wall}
    row.update({k: r[k] for k in ("tokens_per_s", "peak_gib", "warmup_s", "fa4_ran", "error") if k in r})
    if "error" in row:
        row["log_tail"] = _tail(output)
    return row


def peer_row(run: dict, args, limit: float, site: tuple[str, str] | None) -> dict:
    spec = {k: run[k] for k in DEFAULTS if k not in ("limit", "keep_ends")}  # keep_ends: ours only
    spec.update(shape=shape(run["model"], run["layers"]), steps=args.steps, warmup=args.warmup, device=args.device)
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (site[1], env.get("PYTHONPATH"))))
    output, stopped, wall = run_child([sys.executable, str(PEER_SCRIPTS[run["impl"]]), json.dumps(spec)], env, limit)
    keep_profile(run, args, output)
    lines = [line[len(MARK):] for line in output.splitlines() if line.startswith(MARK)]
    row = json.loads(lines[-1]) if lines else {"impl": run["impl"], "error": stopped or "no row"}
    row["wall_s"] = wall  # the process's, start-up and imports included
    if stopped and "error" in row:
        row["error"] = f"{stopped}: {row['error']}"
    if site and "version" not in row:
        row["version"] = site[0]
    if "error" in row:
        row["log_tail"] = _tail(output)
    return row


def measure(run: dict, args, limit: float, sites: list) -> list[dict]:
    """The row of one run. torchtitan rows walk the releases in `sites` within the row's one time
    limit: a release that fails (other than by memory) before it has run once is dropped; the first
    that runs is kept for every row after."""
    if run["impl"] == "ours":
        return [ours_row(run, args, limit)]
    if run["impl"] != "torchtitan" or not sites:
        return [peer_row(run, args, limit, None)]
    rows, deadline = [], time.perf_counter() + limit
    while True:
        row = peer_row(run, args, deadline - time.perf_counter(), sites[0])
        rows.append(row)
        if "error" not in row:
            del sites[1:]
        if len(sites) == 1 or any(s in row.get("error", "") for s in KEEP) or "error" not in row:
            return rows
        print(f"torchtitan {sites[0][0]} failed ({row['error'][:160]}); trying {sites[1][0]}", flush=True)
        sites.pop(0)
        if deadline - time.perf_counter() < 30:
            return rows


def finish(row: dict, run: dict, args) -> dict:
    """The row as written: the run's settings, MFU, the parameter check."""
    out = {"date": time.strftime("%Y-%m-%d"), **{k: run[k] for k in DEFAULTS}, **row, "impl": run["impl"]}
    expected = param_counts(architecture(run["model"], run["layers"]))[0]
    if "params" in row:
        out["params_match"] = row["params"] == expected
    out["params_expected"] = expected
    if "tokens_per_s" in row:
        out["mfu"] = mfu(row["tokens_per_s"], run["model"], run["seq"], args.peak_tflops, run["layers"])
    return out


def print_table(rows: list[dict]) -> None:
    print(f"\n{'impl':11} {'version':8} {'model':5} {'seq':>5} {'mb':>3} {'prec':10} {'ac':>2} {'tok/s':>8} {'MFU':>6} "
          f"{'peak GiB':>8} {'warm-up s':>9}")
    for r in rows:
        prec = ("bf16 params" if r["bf16"] else "bf16") if r["fp8"] == "off" else "fp8 " + r["fp8"]
        model = r["model"] + (f"/L{r['layers']}" if r["layers"] else "")
        head = (f"{r['impl']:11} {str(r.get('version', '')):8} {model:5} {r['seq']:5} {r['mb']:3} {prec:10} "
                f"{r['ac']:2}")
        if "error" in r:
            print(f"{head} {r['error'][:110]}")
        else:
            print(f"{head} {r['tokens_per_s']:8,} {100 * r['mfu']:5.1f}% {r.get('peak_gib') or 0:8.1f} "
                  f"{r.get('warmup_s', 0):9.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=[], help="impl:key=value,... (repeatable, run in order)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--budget-s", type=float, default=1e9, help="rows that cannot get 30 s within this are skipped")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--torchtitan-site", action="append", default=[], metavar="VERSION=DIR")
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    p.add_argument("--profile-dir", type=Path, default=None, help="where rows with profile=1 leave their report")
    args = p.parse_args()
    runs = [parse_run(text) for text in args.run]
    sites = [tuple(s.split("=", 1)) for s in args.torchtitan_site]
    start, rows = time.perf_counter(), []
    for run in runs:
        limit = min(run["limit"], args.budget_s - (time.perf_counter() - start))
        done = [{"error": f"skipped: {args.budget_s:.0f} s budget used"}] if limit < 30 else measure(run, args, limit, sites)
        for row in done:
            rows.append(finish(row, run, args))
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
