"""Training throughput and MFU of cptrain's model vs. the peer baseline, in one process on one GPU.

The peer: HF transformers' model of the preset's family (LlamaForCausalLM for the Llama shapes; fp32
master weights, bf16 autocast, SDPA, fused torch AdamW, torch.compile of the whole model). Ours: the
cptrain model through the step the trainer runs (trainer/engines/local.py LocalEngine +
trainer/loss.py): forward/backward, grad clipping, AdamW. Both take one micro-batch per optimizer
step, on random tokens (no data loading in the timing).

MFU = tokens/s * model FLOPs per token / peak (989 TFLOP/s, H100/H200 dense bf16, also for FP8 runs):
6 per matmul weight (blocks and output head) + 12 * heads * head_dim * S / 2 (causal attention
attends to half the keys), cptrain.model.config.flops_per_token, as torchtitan and OLMo-core count.
`hfu` adds the recomputed forward of activation checkpointing. `mfu_dense` is the count of the
earlier tables (6 N_non-embedding + 12 L d S: no head, full attention), for comparison with them.

    python3 bench/bench_mfu.py --model 350M --run peer:mb=8 --run ours:mb=8,attn=flex,doc=1,ce=8192
    python3 bench/bench_mfu.py --attention   # attention kernels alone (fwd+bwd)

A run is `impl:key=value,...`; keys (ours unless noted): mb (micro-batch, both), compile (0/1,
both), attn (sdpa|flex), doc (document masking 0/1), sdpa (auto|cudnn|flash|efficient, both),
ce (train.loss_chunk_tokens), ac (activation checkpointing 0/1), bf16 (train.param_dtype=bf16 0/1),
fa4 (1: FlashAttention-4 behind attn=flash_attn when flash-attn-4 is installed; 0: torch's FA2),
fp8 (off|tensorwise|rowwise: train.fp8, torchao float8 in the block linears), offload (1: the
checkpointed block inputs in pinned host memory, train.offload_activations), tile (train.mlp_tile_tokens),
opt (adamw|adamw8bit: optim.name; 8-bit moments, a quarter of fp32's memory), keep_ends (with fp8:
1 keeps the first and last blocks in bf16, train.fp8_keep_ends; 0 converts every block's linears);
of a mixture of experts (olmoe-1b-7b, qwen3-30b-a3b, mixtral-8x7b): layers (0: the preset's; fewer, to
fit one GPU, both), experts (ours: moe.experts auto|grouped|loop; peer: transformers' experts
implementation eager|grouped_mm|batched_mm). MFU counts the active parameters (the router, the top-k
experts). --seq sets the sequence length (recorded in every row as seq_len).

    python3 bench/bench_mfu.py --model olmoe-1b-7b --run peer:mb=4,bf16=1,experts=grouped_mm \
        --run ours:mb=4,bf16=1,ce=4096,attn=flash_attn,doc=1,experts=grouped

Results are appended to --out as JSON lines; a table is printed last.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import time
from pathlib import Path

import torch


from cptrain.model.config import flops_per_token, hardware_flops_per_token, param_counts
from cptrain.model.hf_config import to_hf_config
from cptrain.model.presets import first_layers, preset

DEFAULTS = {"mb": 8, "compile": 1, "attn": "sdpa", "doc": 0, "sdpa": "auto", "ce": 0, "ac": 0, "bf16": 0, "fa4": 1,
            "fp8": "off", "offload": 0, "tile": 0, "layers": 0, "experts": "auto", "opt": "adamw",
            "keep_ends": 1}
TEXT_KEYS = ("attn", "sdpa", "fp8", "experts", "opt")
SEQ = 2048


def parse_run(text: str) -> dict:
    impl, _, rest = text.partition(":")
    run = dict(DEFAULTS, impl=impl)
    for item in filter(None, rest.split(",")):
        key, value = item.split("=")
        run[key] = value if key in TEXT_KEYS else int(value)
    return run


def sdpa_context(choice: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if choice == "auto":
        return contextlib.nullcontext()
    rest = [b for b in (*order.values(), SDPBackend.MATH) if b != order[choice]]
    return sdpa_kernel([order[choice], *rest], set_priority=True)


def random_batch(mb: int, vocab: int, device, gen: torch.Generator, mean_doc: int) -> dict:
    """Random tokens [mb, S+1] and doc_ids from exponential document lengths (mean `mean_doc`)."""
    tokens = torch.randint(0, vocab, (mb, SEQ + 1), generator=gen)
    doc_ids = torch.zeros(mb, SEQ + 1, dtype=torch.int32)
    for row in range(mb):
        pos, doc = 0, 0
        while pos < SEQ + 1:
            length = max(1, int(-mean_doc * math.log(1.0 - torch.rand(1, generator=gen).item())))
            doc_ids[row, pos:pos + length] = doc
            pos, doc = pos + length, doc + 1
    return {"tokens": tokens.to(device), "doc_ids": doc_ids.to(device)}


def shape(model_name: str, run: dict):
    """The preset, with `layers` blocks when given (an MoE shape cut down to one GPU keeps its layers' shape)."""
    arch = preset(model_name)
    return first_layers(arch, run["layers"]) if run["layers"] else arch


def build_ours(model_name: str, run: dict, device):
    from cptrain.trainer.config import load_config
    from cptrain.trainer.engines import build_engine
    from cptrain.trainer.engines.layout import Layout
    from cptrain.trainer.engines.spec import engine_spec
    from cptrain.trainer.loss import lm_loss

    overrides = [f"--model.preset={model_name}", f"--model.attention={run['attn']}",
                 f"--model.doc_masking={bool(run['doc'])}", f"--data.seq_len={SEQ}",
                 f"--train.micro_batch_size={run['mb']}", f"--train.global_batch_tokens={run['mb'] * SEQ}",
                 f"--train.compile={bool(run['compile'])}", f"--train.activation_checkpointing={bool(run['ac'])}",
                 f"--train.loss_chunk_tokens={run['ce']}", f"--train.device={device.type}", f"--train.fp8={run['fp8']}",
                 f"--train.offload_activations={bool(run['offload'])}", f"--train.mlp_tile_tokens={run['tile']}",
                 f"--optim.name={run['opt']}", f"--train.fp8_keep_ends={bool(run['keep_ends'])}",
                 f"--train.param_dtype={'bf16' if run['bf16'] else 'fp32'}",
                 f"--train.precision={'bf16' if run['bf16'] else 'auto'}",
                 f"--model.max_seq_len={max(SEQ, preset(model_name).max_seq_len)}"]
    if preset(model_name).n_experts:
        overrides += [f"--model.n_layers={run['layers'] or preset(model_name).n_layers}", f"--moe.experts={run['experts']}",
                      f"--model.moe_dense_layers={shape(model_name, run).moe_dense_layers}"]
    cfg = load_config(None, overrides)
    set_fa4(bool(run["fa4"]), device)
    engine = build_engine(engine_spec(cfg, Layout(device=device)), cfg.model.arch)
    scale = 1.0 / (run["mb"] * SEQ)

    def step(batch):
        engine.forward_backward(batch, lambda m, b: lm_loss(m, b, scale, run["ce"]), sync=True)
        return engine.step(1e-4)
    return step, cfg.model.arch


def set_fa4(enabled: bool, device) -> None:
    """FlashAttention-4 (when installed) or torch's FlashAttention-2 behind attn=flash_attn."""
    from cptrain.model import attention

    attention._fa4 = None if enabled else False  # None: decided again on the next call
    attention.fa4_interface(device)


def build_peer(model_name: str, run: dict, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = shape(model_name, run)
    hf = to_hf_config(arch)
    torch.manual_seed(0)
    experts = {"experts_implementation": run["experts"]} if arch.n_experts and run["experts"] != "auto" else {}
    with device:
        config = AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32, **experts)
    if run["bf16"]:  # pure bf16 parameters (and so AdamW moments), as ours with bf16=1
        model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    fwd = torch.compile(model) if run["compile"] else model

    def step(batch):
        x = batch["tokens"][:, :SEQ]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = fwd(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)
    return step, arch


def measure(model_name: str, run: dict, device, steps: int, warmup: int, peak_tflops: float,
            profile: bool = False) -> dict:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = {"model": model_name, **run, "seq_len": SEQ, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}
    try:
        with sdpa_context(run["sdpa"]):
            step, arch = (build_peer if run["impl"] == "peer" else build_ours)(model_name, run, device)
            if run["impl"] == "ours":  # whether FlashAttention-4 is installed and ran, not only asked for
                from cptrain.model import attention

                result["fa4_ran"] = int(run["attn"] == "flash_attn" and bool(attention._fa4))
            gen = torch.Generator().manual_seed(1)
            batches = [random_batch(run["mb"], arch.vocab_size, device, gen, 800) for _ in range(4)]
            t0 = time.perf_counter()
            for i in range(warmup):
                step(batches[i % 4])
            result["warmup_s"] = round(time.perf_counter() - t0, 1)
            _sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                step(batches[i % 4])
            _sync(device)
            dt = time.perf_counter() - t0
            if profile:
                print_profile(step, batches, device)
        tps = steps * run["mb"] * SEQ / dt
        peak = peak_tflops * 1e12
        dense = 6 * param_counts(arch)[1] + 12 * arch.n_layers * arch.dim * SEQ  # the earlier tables' count
        result.update(tokens_per_s=round(tps), mfu=round(tps * flops_per_token(arch, SEQ) / peak, 4),
                      hfu=round(tps * hardware_flops_per_token(arch, SEQ, bool(run["ac"])) / peak, 4),
                      mfu_dense=round(tps * dense / peak, 4))
        if device.type == "cuda":
            result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except torch.OutOfMemoryError:
        result["error"] = "OOM"
    except Exception as e:  # a failed variant is a result to report, not a reason to lose the others
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    step = batches = None  # noqa: F841  (free the model before the next run)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def print_profile(step, batches, device) -> None:
    """GPU time per kernel over 3 steps: where the time goes that MFU does not count (bench/kernel_profile.py)."""
    from kernel_profile import profile_text

    steps = iter(range(3))
    print(profile_text(lambda: step(batches[next(steps) % 4]), lambda: _sync(device)), flush=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def attention_bench(device, out: Path | None) -> list[dict]:
    """fwd+bwd of attention alone at the two benchmark shapes, per kernel."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from triton.testing import do_bench

    from cptrain.model.attention import doc_causal_mask, doc_segments

    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for b, h, hd in ((8, 16, 64), (4, 16, 128)):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, SEQ, hd, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        doc_ids = random_batch(b, 2, device, gen, 800)["doc_ids"][:, :SEQ]
        _, seg = doc_segments(doc_ids)

        def doc_mod(bi, hi, qi, ki):
            return (seg[bi, qi] == seg[bi, ki]) & (qi >= ki)

        def causal_mod(bi, hi, qi, ki):
            return qi >= ki

        dense = doc_causal_mask(doc_ids)
        cases = {
            "sdpa flash causal": lambda: _sdpa(q, k, v, "flash", None),
            "sdpa cudnn causal": lambda: _sdpa(q, k, v, "cudnn", None),
            "sdpa efficient causal": lambda: _sdpa(q, k, v, "efficient", None),
            "flex causal": lambda: flex(q, k, v, block_mask=create_block_mask(causal_mod, None, None, SEQ, SEQ, device=device)),
            "flex doc (mask built each call)": lambda: flex(q, k, v, block_mask=create_block_mask(doc_mod, b, None, SEQ, SEQ, device=device)),
            "sdpa efficient doc (dense mask)": lambda: _sdpa(q, k, v, "efficient", dense),
            "sdpa cudnn doc (dense mask)": lambda: _sdpa(q, k, v, "cudnn", dense),
        }
        mask_ms = do_bench(lambda: create_block_mask(doc_mod, b, None, SEQ, SEQ, device=device), return_mode="median")
        for name, fn in cases.items():
            row = {"shape": f"B{b} H{h} S{SEQ} hd{hd}", "kernel": name}
            try:
                row["fwd_bwd_ms"] = round(do_bench(lambda: fn().sum().backward(), return_mode="median"), 3)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rows.append(row)
        rows.append({"shape": f"B{b} H{h} S{SEQ} hd{hd}", "kernel": "create_block_mask (doc) alone", "fwd_bwd_ms": round(mask_ms, 3)})
    for r in rows:
        print(json.dumps(r), flush=True)
        if out:
            with out.open("a") as f:
                f.write(json.dumps(r) + "\n")
    return rows


def _sdpa(q, k, v, backend: str, mask):
    import torch.nn.functional as F

    with sdpa_context(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':6} {'run':58} {'tok/s':>9} {'MFU':>6} {'peak GiB':>8} {'warm-up s':>9}")
    for r in rows:
        spec = r["impl"] + ":" + ",".join(f"{k}={r[k]}" for k in DEFAULTS)
        if "error" in r:
            print(f"{r['model']:6} {spec:58} {r['error']}")
        else:
            print(f"{r['model']:6} {spec:58} {r['tokens_per_s']:9,} {100 * r['mfu']:5.1f}% {r.get('peak_gib', 0):8.1f} {r['warmup_s']:9.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="350M", help="model preset (350M = 374M peer shape, 1.3B = 1.35B)")
    p.add_argument("--run", action="append", default=[], help="impl:key=value,... (repeatable)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (compilation happens here)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining runs after this many seconds")
    p.add_argument("--attention", action="store_true", help="time the attention kernels alone")
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    p.add_argument("--profile", action="store_true", help="print a kernel profile of each run")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seq", type=int, default=SEQ, help="sequence length (2048 for the reported figures)")
    p.add_argument("--mem-cap-gib", type=float, default=0.0,
                   help="cap this process's GPU memory (an 80 GB H100's 78 GiB on a larger H200), recorded in each row")
    args = p.parse_args()
    globals()["SEQ"] = args.seq
    device = torch.device(args.device)
    if args.mem_cap_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * 2**30 / total), torch.cuda.current_device())
        DEFAULTS["mem_cap_gib"] = args.mem_cap_gib
    if args.attention:
        attention_bench(device, args.out)
    start, rows = time.perf_counter(), []
    for text in args.run:
        if time.perf_counter() - start > args.budget_s:
            print(f"skipped (over budget): {text}", flush=True)
            continue
        row = measure(args.model, parse_run(text), device, args.steps, args.warmup, args.peak_tflops, args.profile)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    if rows:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
