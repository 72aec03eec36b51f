#!/usr/bin/env bash
# GPU checks run on the device machine (one call per stage); results land in $OUT (or ./gpu_out).
#   bash bench/gpu_check.sh STAGE      STAGE: peers | peers2 | perf | scale | science (FP8, engines, Muon; after fa4stage) | profile | engines2 |
#                                      engines3 | offload8b | ckpt1b | longctx | cp1 |
#                                      sweep374 | sweep | parity | loop | loader | engines | tests | fa4* | moe |
#                                      stash | longctx2 | extend | peers3 | peers4 | peers5 | moe1 | peers6 | peers7 | peers8 | peers9 | peers9b |
#                                      moepeers
# Wheels for packages missing from the GPU image (deepspeed, mosaicml-streaming) are carried in
# .carry/ (bench/README.md says how to build them) and installed into /tmp/site.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/$1.log") 2>&1  # the raw output of the stage, for bench/results/
# The checkout is the `cptrain` package (pyproject.toml maps it); a link makes it importable without an install.
mkdir -p /tmp/site && ln -sfn "$PWD" /tmp/site/cptrain
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD DS_ACCELERATOR=cuda TORCH_CUDA_ARCH_LIST=9.0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PATH=/tmp/site/bin:$PATH  # the carried ninja, which DeepSpeed's JIT op builds look for
if ls .carry/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/streaming ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/*.whl
fi
# flash-attn-4 travels in two calls (its compiler library alone is 193 MB, over one call's carry):
# `fa4stage` with .carry/fa4a (the xz'd _cutlass_ir .so) leaves it in /tmp/fa4; the next call, on the
# still-warm machine, carries .carry/fa4b (the other wheels) and installs both (bench/README.md).
if [ -d .carry/fa4b ] && [ -f /tmp/fa4/ir.so.xz ] && [ ! -d /tmp/site/nvidia_cutlass_dsl/dsl_packages/cutlass/cute ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/fa4b/*.whl
  tar xzf .carry/fa4b/libs_cu13_small.tgz -C /tmp/site
  xz -dc /tmp/fa4/ir.so.xz > /tmp/site/nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
  xz -dc .carry/fa4b/rt.so.xz > /tmp/site/nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so
fi
if ls .carry/fa4b/mosaicml_streaming*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/streaming ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/fa4b/{mosaicml,zstd,python_snappy,cramjam,brotli,catalogue}*.whl
fi
# Extra wheels for a stage (.carry/wheels: torchao and gguf for `longctx2`; .carry/wheels_data: the
# mosaicml-streaming set for `extend`), installed whenever carried.
for w in .carry/wheels .carry/wheels_data; do
  if ls $w/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $w/*.whl
  fi
done
# The peer trainers (`peers*` stages, carrying .carry/peers): their wheels into /tmp/site, each torchtitan
# release into its own folder (bench/bench_peers.py tries them in order: 0.3 needs torch 2.13).
if ls .carry/peers/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/olmo_core ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/peers/*.whl
  for w in .carry/peers/torchtitan/torchtitan-*.whl; do
    v=$(basename "$w" | cut -d- -f2)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "/tmp/site-torchtitan-$v" "$w"
  done
fi
TT_SITES="--torchtitan-site 0.3.0=/tmp/site-torchtitan-0.3.0 --torchtitan-site 0.2.2=/tmp/site-torchtitan-0.2.2 --torchtitan-site 0.2.1=/tmp/site-torchtitan-0.2.1"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
B="python3 bench/bench_mfu.py --steps 12 --warmup 4"
F="ce=4096,attn=flash_attn,doc=1"  # our fast path: fused chunked loss, FA4 (or torch's FA2) with document masking
loop_configs() {  # CONFIG:MICRO_BATCH[:PRESET] ...: 30 steps of each shipped config (with another model preset) through `cptrain train`, median tokens/s
  for spec in "$@"; do
    IFS=: read -r config mb model <<< "$spec"
    name=$config${model:+_$model}
    timeout 150 python3 -m cptrain.launch.cli train trainer/configs/$config.yaml --run_dir=/tmp/loop_$name ${model:+--model.preset=$model} \
      "--data.domains=[{name: english, path: .carry/data/english2048}]" --train.micro_batch_size=$mb --train.global_batch_tokens=$((mb * 2048)) \
      --train.max_tokens=$((mb * 2048 * 30)) --eval.at_start=false --eval.max_samples=8 --checkpoint.at_end=false \
      --log.progress=false 2>&1 | grep -v -i warn | tail -3
    python3 -c "import json,statistics as st; r=[json.loads(l) for l in open('/tmp/loop_$name/metrics.jsonl')]; r=[x for x in r if x.get('step',0)>=6 and 'tokens_per_s' in x]; print('$name', 'mb $mb', 'tokens/s', round(st.median(x['tokens_per_s'] for x in r)), 'mfu', round(st.median(x['mfu'] for x in r),4))" | tee -a "$OUT/loop.txt"
  done
}
case "$1" in
peers)  # cptrain vs OLMo-core vs torchtitan at one shape set, one process per row, by priority (~520 s):
  # 1B (Llama-3.2-1B) seq 2048 bf16 at micro-batch 8 and 16, FP8 at 16, then the 1.35B shape; later rows are
  # skipped when the budget is spent (bench_peers.py writes them as skipped)
  P="python3 bench/bench_peers.py --steps 10 --warmup 3 --budget-s ${PEERS_BUDGET:-500} --out $OUT/peers.jsonl $TT_SITES"
  $P --run ours:model=1B,mb=8,limit=80 --run olmo-core:model=1B,mb=8,limit=110 --run torchtitan:model=1B,mb=8,limit=150 \
    --run ours:model=1B,mb=16,limit=80 --run olmo-core:model=1B,mb=16,limit=100 --run torchtitan:model=1B,mb=16,limit=100 \
    --run ours:model=1B,mb=16,fp8=tensorwise,limit=80 --run olmo-core:model=1B,mb=16,fp8=tensorwise,limit=100 \
    --run torchtitan:model=1B,mb=16,fp8=tensorwise,limit=100 \
    --run ours:model=1.3B,mb=12,limit=80 --run olmo-core:model=1.3B,mb=12,limit=100 --run torchtitan:model=1.3B,mb=12,limit=100 \
    2>&1 | grep -v -i "warn" | tail -20 ;;
peers2)  # what `peers` has no time for: 8B (bf16 parameters, full AC), 1B at seq 8192 and 32K, OLMo-core's fused loss
  P="python3 bench/bench_peers.py --steps 6 --warmup 2 --budget-s 520 --out $OUT/peers.jsonl $TT_SITES"
  $P --run ours:model=8B,mb=2,ac=1,bf16=1,limit=110 --run olmo-core:model=8B,mb=2,ac=1,bf16=1,limit=150 \
    --run torchtitan:model=8B,mb=2,ac=1,bf16=1,limit=150 \
    --run ours:model=1B,seq=8192,mb=2,limit=70 --run olmo-core:model=1B,seq=8192,mb=2,limit=90 \
    --run torchtitan:model=1B,seq=8192,mb=2,limit=90 \
    --run ours:model=1B,seq=32768,mb=1,ac=1,limit=80 --run olmo-core:model=1B,seq=32768,mb=1,ac=1,limit=90 \
    --run torchtitan:model=1B,seq=32768,mb=1,ac=1,limit=90 --run olmo-core:model=1B,mb=16,loss=fused_linear,limit=100 \
    2>&1 | grep -v -i "warn" | tail -14 ;;
peers3)  # on the machine longctx2 left warm (FlashAttention-4 installed), carrying .carry/peers: the 1B rows again with
  # FA4 for ours, bf16 and FP8, ours converting every block to FP8 as the peers do (keep_ends=0), by priority
  P="python3 bench/bench_peers.py --steps 10 --warmup 3 --budget-s ${PEERS_BUDGET:-520} --out $OUT/peers.jsonl $TT_SITES"
  $P --run ours:model=1B,mb=16,limit=80 --run torchtitan:model=1B,mb=16,limit=100 --run olmo-core:model=1B,mb=16,limit=100 \
    --run ours:model=1B,mb=16,fp8=tensorwise,keep_ends=0,limit=80 --run torchtitan:model=1B,mb=16,fp8=tensorwise,limit=100 \
    --run olmo-core:model=1B,mb=16,fp8=tensorwise,limit=100 2>&1 | grep -v -i "warn" | tail -10 ;;
peers4)  # after peers3 on the same machine: a kernel profile of ours at the 1B bf16 row, then 1B at seq 8192 and the
  # 8B shape (bf16 parameters, full activation checkpointing) against both peers
  timeout 120 python3 bench/bench_mfu.py --model 1B --steps 4 --warmup 3 --profile \
    --run ours:mb=16,ce=4096,attn=flash_attn,doc=0 > "$OUT/profile_ours_1b.txt" 2>&1
  P="python3 bench/bench_peers.py --steps 6 --warmup 2 --budget-s ${PEERS_BUDGET:-400} --out $OUT/peers.jsonl $TT_SITES"
  $P --run ours:model=1B,seq=8192,mb=2,limit=70 --run olmo-core:model=1B,seq=8192,mb=2,limit=90 \
    --run torchtitan:model=1B,seq=8192,mb=2,limit=90 --run ours:model=8B,mb=2,ac=1,bf16=1,limit=110 \
    --run olmo-core:model=8B,mb=2,ac=1,bf16=1,limit=130 --run torchtitan:model=8B,mb=2,ac=1,bf16=1,limit=130 \
    2>&1 | grep -v -i "warn" | tail -10 ;;
peers5)  # after peers4 on the same machine: 1B at 32K (micro-batch 1, full activation checkpointing) against both peers
  P="python3 bench/bench_peers.py --steps 4 --warmup 2 --budget-s ${PEERS_BUDGET:-300} --out $OUT/peers.jsonl $TT_SITES"
  $P --run ours:model=1B,seq=32768,mb=1,ac=1,limit=80 --run olmo-core:model=1B,seq=32768,mb=1,ac=1,limit=100 \
    --run torchtitan:model=1B,seq=32768,mb=1,ac=1,limit=100 2>&1 | grep -v -i "warn" | tail -6 ;;
perf)  # throughput in one call against the compiled peer's best: 1.35B bf16 and FP8, 374M, the SmolLM2-135M shape
  $B --model 1.3B --budget-s 330 --out "$OUT/mfu.jsonl" --run peer:mb=12 --run ours:mb=12,$F --run ours:mb=16,$F \
    --run ours:mb=16,$F,fp8=tensorwise --run ours:mb=24,$F,fp8=tensorwise --run ours:mb=16,$F,fp8=rowwise 2>&1 \
    | grep -v -i "warn\|exe_args" | tail -8
  $B --model 350M --budget-s 90 --out "$OUT/mfu.jsonl" --run peer:mb=8 --run ours:mb=32,$F 2>&1 | grep -v -i "warn\|exe_args" | tail -3
  $B --model smollm2-135m --budget-s 110 --out "$OUT/mfu.jsonl" --run peer:mb=16 --run peer:mb=32 \
    --run ours:mb=32,ce=8192,attn=flash_attn,doc=1 --run ours:mb=64,ce=8192,attn=flash_attn,doc=1 2>&1 \
    | grep -v -i "warn\|exe_args" | tail -5 ;;
scale)  # ours at the SmolLM2 shape (the peer's rows are in perf); 3B and 8B, bf16 vs FP8; the engines at 1B and the SmolLM2 shape
  $B --model smollm2-135m --budget-s 40 --out "$OUT/mfu.jsonl" --run ours:mb=32,ce=8192,attn=flash_attn,doc=1 \
    --run ours:mb=64,ce=8192,attn=flash_attn,doc=1 2>&1 | grep -v -i "warn\|exe_args" | tail -3
  $B --model 3B --budget-s 60 --out "$OUT/mfu.jsonl" --run ours:mb=4,$F --run ours:mb=4,$F,fp8=tensorwise 2>&1 \
    | grep -v -i "warn\|exe_args" | tail -3
  timeout 160 python3 bench/bench_engines.py --preset 1B --gpus 1 --engines local,fsdp2,zero3 --micro-batch 8 --compile \
    --steps 6 --warmup 3 2>&1 | grep -v -i "warn\|exe_args" | tail -5
  timeout 110 python3 bench/bench_engines.py --preset smollm2-135m --gpus 1 --engines local,fsdp2,zero2 --micro-batch 32 --compile \
    --ce 8192 --steps 6 --warmup 3 2>&1 | grep -v -i "warn\|exe_args" | tail -5
  # fp32 master weights + AdamW moments of 8B (128 GB) do not fit one H200 beside activations: bf16 parameters.
  $B --model 8B --budget-s 60 --out "$OUT/mfu.jsonl" --run ours:mb=2,$F,bf16=1,ac=1 --run ours:mb=2,$F,bf16=1,ac=1,fp8=tensorwise \
    2>&1 | grep -v -i "warn\|exe_args" | tail -3 ;;
science)  # FP8 and Muon loss curves vs bf16 AdamW with the noise floor, checkpoint cost at 1B, 8B under ZeRO-3 + optimizer offload
  timeout 280 python3 bench/loss_parity.py --data .carry/data/english2048 --out /tmp/parity --steps 200 --preset 350M \
    --runs fast,fast-2,fast-fp8,fast-muon --ref fast --noise fast-2 2>&1 | grep -v -i "warn\|exe_args" | tail -45
  cp /tmp/parity/parity.json "$OUT/" 2>/dev/null
  timeout 100 python3 bench/bench_checkpoint.py --preset 1B --engines local,fsdp2 --out "$OUT/checkpoint.jsonl" 2>&1 \
    | grep -v -i "warn" | tail -6
  timeout 170 python3 bench/bench_engines.py --preset 8B --gpus 1 --engines zero3_offload --micro-batch 4 --ac --steps 2 \
    --warmup 1 --ds-optimizer deepspeed 2>&1 | grep -v -i "warn\|exe_args" | tail -5 ;;
pending)  # what 2026-12-02 left unmeasured (after fa4stage): checkpoint cost at 1B, Qwen3 / Gemma 3 shapes through the loop, 8B bf16 vs FP8
  timeout 150 python3 bench/bench_checkpoint.py --preset 1B --engines local,fsdp2 --out "$OUT/checkpoint.jsonl" 2>&1 \
    | grep -v -i "warn" | tail -6
  loop_configs gpu_350m:16:qwen3-0.6b gpu_350m:32:gemma3-270m
  $B --model 8B --budget-s 60 --out "$OUT/mfu.jsonl" --run ours:mb=2,$F,bf16=1,ac=1 --run ours:mb=2,$F,bf16=1,ac=1,fp8=tensorwise \
    2>&1 | grep -v -i "warn\|exe_args" | tail -3 ;;
profile)  # what the sharded engines cost beyond the local one on one GPU, with the knobs that might close the gap
  timeout 280 python3 bench/bench_engines.py --preset smollm2-135m --gpus 1 --micro-batch 32 --compile --ce 8192 --steps 6 \
    --warmup 3 --profile --engines local,fsdp2,fsdp2@fsdp.reshard_after_forward=false,zero2,zero2@deepspeed.extra.zero_optimization.overlap_comm=false,zero2@deepspeed.deepcompile=true \
    2>&1 | grep -v -i "warn\|exe_args" | tail -12
  timeout 290 python3 bench/bench_engines.py --preset 1B --gpus 1 --micro-batch 8 --compile --steps 6 --warmup 3 --profile \
    --engines fsdp2,zero3,zero3@deepspeed.deepcompile=true,zero3@deepspeed.extra.zero_optimization.stage3_prefetch_bucket_size=200000000 \
    2>&1 | grep -v -i "warn\|exe_args" | tail -10 ;;
engines2)  # after profile: the engines as fixed (FSDP2 unsharded on one rank, DeepSpeed's fused Adam, DeepCompile), 8B under ZeRO-3 offload
  timeout 200 python3 bench/bench_engines.py --preset smollm2-135m --gpus 1 --micro-batch 32 --compile --ce 8192 --steps 6 \
    --warmup 3 --ds-optimizer deepspeed --engines local,fsdp2,zero2 2>&1 | grep -v -i "warn\|exe_args" | tail -6
  # DeepCompile recompiles with its prefetch passes at step 5: the timed steps start after it
  timeout 200 python3 bench/bench_engines.py --preset 1B --gpus 1 --micro-batch 8 --compile --steps 6 --warmup 8 \
    --ds-optimizer deepspeed --engines fsdp2,zero3@deepspeed.deepcompile=true 2>&1 | grep -v -i "warn\|exe_args" | tail -5
  # fp32 master + Adam moments of 8B are 96 GB: 60% of them on the CPU (DeepSpeed's partial offload), the rest on the GPU
  timeout 190 python3 bench/bench_engines.py --preset 8B --gpus 1 --micro-batch 4 --ac --steps 2 --warmup 1 \
    --ds-optimizer deepspeed --engines zero3_offload@deepspeed.extra.zero_optimization.offload_optimizer.ratio=0.6 \
    2>&1 | grep -v -i "warn\|exe_args" | tail -5 ;;
engines3)  # after engines2: ZeRO-2 with the overflow taken from the norm (profiled), ZeRO-3 DeepCompile timed after its recompile
  timeout 190 python3 bench/bench_engines.py --preset smollm2-135m --gpus 1 --micro-batch 32 --compile --ce 8192 --steps 6 \
    --warmup 3 --ds-optimizer deepspeed --profile --engines local,zero2 2>&1 | grep -v -i "warn\|exe_args" | tail -4
  tar czf "$OUT/profiles.tgz" -C "$OUT" $(cd "$OUT" && ls profile_*.txt) && rm "$OUT"/profile_*.txt
  # DeepSpeed's CPU Adam JIT-builds for a minute or more: built now, during the 1B compiles (its timed
  # steps come after), it is ready for `offload8b` on the still-warm machine
  (nice -n 19 python3 -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" \
    > "$OUT/cpu_adam_build.log" 2>&1 &)
  timeout 340 python3 bench/bench_engines.py --preset 1B --gpus 1 --micro-batch 8 --compile --steps 6 --warmup 8 \
    --ds-optimizer deepspeed --engines fsdp2,zero3@deepspeed.deepcompile=true 2>&1 | grep -v -i "warn\|exe_args" | tail -4 ;;
offload8b)  # alone (after engines3 built the CPU Adam): 8B under ZeRO-3 with 60% of the optimizer on the CPU
  timeout 560 python3 bench/bench_engines.py --preset 8B --gpus 1 --micro-batch 4 --ac --steps 2 --warmup 1 \
    --ds-optimizer deepspeed --engines zero3_offload@deepspeed.extra.zero_optimization.offload_optimizer.ratio=0.6 \
    2>&1 | grep -v -i "warn\|exe_args" | tail -5 ;;
ckpt1b)  # FSDP2's async save from reused pinned buffers: the GPU test, then its cost at 1B (the local engine's: `pending`)
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_faults.py -k async_checkpoints_hold 2>&1 | tail -3
  timeout 300 python3 bench/bench_checkpoint.py --preset 1B --engines fsdp2 --out "$OUT/checkpoint.jsonl" 2>&1 \
    | grep -v -i "warn" | tail -6 ;;
qwen3loop) loop_configs gpu_350m:16:qwen3-0.6b ;;
fa4stage) mkdir -p /tmp/fa4 && cp .carry/fa4a/ir.so.xz /tmp/fa4/ && ls -la /tmp/fa4 ;;
fa4)  # the GPU tests (FA2 and FA4), then ours with FA4 vs the peer in the same call
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py tests/test_loss.py 2>&1 | tail -15 | tee "$OUT/pytest.txt"
  $B --model 1.3B --budget-s 300 --out "$OUT/mfu.jsonl" --run peer:mb=12 --run ours:mb=12,ce=4096,attn=flash_attn,doc=1 \
    --run ours:mb=12,ce=4096,attn=flash_attn,doc=1,fa4=0 --run ours:mb=16,ce=4096,attn=flash_attn,doc=1 \
    --run peer:mb=4 --run ours:mb=4,ce=4096,attn=flash_attn,doc=1 2>&1 | tee "$OUT/fa4_1b.log"
  $B --model 350M --budget-s 100 --out "$OUT/mfu.jsonl" --run peer:mb=8 --run ours:mb=32,ce=4096,attn=flash_attn,doc=1 \
    --run ours:mb=8,ce=4096,attn=flash_attn,doc=1 2>&1 | tee "$OUT/fa4_374.log" ;;
sweep374)
  $B --model 350M --budget-s 400 --out "$OUT/mfu374.jsonl" \
    --run peer:mb=8 --run ours:mb=8 --run ours:mb=8,ce=4096 --run ours:mb=8,ce=4096,sdpa=cudnn \
    --run ours:mb=8,ce=4096,attn=flex,doc=1 --run ours:mb=8,ce=4096,attn=flex \
    --run ours:mb=16,ce=4096,sdpa=cudnn --run ours:mb=16,ce=4096,attn=flex,doc=1 \
    --run ours:mb=8,ce=4096,sdpa=cudnn,bf16=1 --run ours:mb=32,ce=4096,sdpa=cudnn,ac=1 \
    --run ours:mb=24,ce=4096,sdpa=cudnn 2>&1 | tee "$OUT/sweep374.log"
  timeout 120 python3 bench/bench_mfu.py --attention --out "$OUT/attention.jsonl" 2>&1 | tail -20 ;;
sweep)  # kernel-level tests, 1.35B levers, varlen document masking at 374M, the 1B preset
  python3 -c "import inspect; from torch.nn.attention.varlen import varlen_attn as f; print('varlen_attn', inspect.signature(f))"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py 2>&1 | tail -15 | tee "$OUT/pytest.txt"
  $B --model 1.3B --budget-s 240 --out "$OUT/mfu.jsonl" --run peer:mb=4 --run ours:mb=4,ce=4096 \
    --run ours:mb=8,ce=4096 --run ours:mb=8,ce=4096,attn=flash_attn,doc=1 --run peer:mb=8 \
    --run ours:mb=12,ce=4096,attn=flash_attn,doc=1 --run ours:mb=8,ce=4096,bf16=1 2>&1 | tee "$OUT/sweep1b.log"
  $B --model 350M --budget-s 60 --out "$OUT/mfu.jsonl" --run ours:mb=16,ce=4096,attn=flash_attn,doc=1 \
    --run ours:mb=8,ce=4096,attn=flash_attn,doc=1 --run ours:mb=32,ce=4096,attn=flash_attn,doc=1 2>&1 | tee "$OUT/sweep374.log"
  $B --model 1B --budget-s 30 --out "$OUT/mfu.jsonl" --run ours:mb=8,ce=4096,attn=flash_attn,doc=1 \
    --run ours:mb=16,ce=4096,attn=flash_attn,doc=1 2>&1 | tee "$OUT/sweep1bpreset.log" ;;
parity)  # loss curves of the fast vs. the plain path, then the demo config through `cptrain train`
  timeout 420 python3 bench/loss_parity.py --data .carry/data/english2048 --out /tmp/parity --steps 300 2>&1 | tail -40
  cp /tmp/parity/parity.json "$OUT/" 2>/dev/null
  timeout 150 python3 -m cptrain.launch.cli train trainer/configs/demo.yaml --run_dir=/tmp/demo_gpu \
    "--data.domains=[{name: english, path: .carry/data/english}]" --train.compile=true --train.precision=bf16 \
    --model.attention=sdpa --log.progress=false 2>&1 | tail -8
  cp /tmp/demo_gpu/metrics.jsonl "$OUT/demo_metrics.jsonl" 2>/dev/null
  $B --model 350M --budget-s 100 --out "$OUT/mfu.jsonl" --run peer:mb=16 --run ours:mb=32,ce=4096 \
    --run ours:mb=16,ce=8192,attn=flash_attn,doc=1 2>&1 | tail -6
  $B --model 1.3B --budget-s 60 --out "$OUT/mfu.jsonl" --run ours:mb=16,ce=4096,attn=flash_attn,doc=1 \
    --run ours:mb=12,ce=4096 2>&1 | tail -5
  $B --model 1.3B --steps 4 --profile --run ours:mb=8,ce=4096,attn=flash_attn,doc=1 > "$OUT/profile1b.txt" 2>&1 ;;
loop)  # the shipped configs through the real loop and loader (`cptrain train`), then the demo config
  loop_configs gpu_350m:32 gpu_1.3b:12 gpu_1b:16
  start=$(date +%s)
  timeout 240 python3 -m cptrain.launch.cli train trainer/configs/demo.yaml --run_dir=/tmp/demo_gpu \
    "--data.domains=[{name: english, path: .carry/data/english}]" --train.compile=true --train.precision=bf16 \
    --model.attention=sdpa --log.progress=false 2>&1 | grep -v Warning | tail -4
  echo "demo wall s: $(( $(date +%s) - start ))" | tee -a "$OUT/loop.txt"
  cp /tmp/demo_gpu/metrics.jsonl "$OUT/demo_metrics.jsonl" 2>/dev/null ;;
engines)  # ZeRO-2/3 and FSDP2 on 1 and 2 GPUs (a multi-GPU kind)
  nvidia-smi topo -m | head -4
  timeout 560 python3 bench/bench_engines.py --preset 1B --gpus 1,2 --micro-batch 8 --compile --steps 8 2>&1 \
    | tee "$OUT/engines.log" | grep -v -i warn | tail -12
  ;;
loader)  # does loading in worker processes close the loop's gap to the bare step? + the peer at 1.35B/12
  for w in 0 2; do
    timeout 120 python3 -m cptrain.launch.cli train trainer/configs/gpu_350m.yaml --run_dir=/tmp/loader_$w \
      "--data.domains=[{name: english, path: .carry/data/english2048}]" --data.num_workers=$w \
      --train.global_batch_tokens=65536 --train.max_tokens=$((65536 * 30)) --eval.at_start=false \
      --eval.max_samples=8 --checkpoint.at_end=false --log.progress=false >/dev/null 2>&1
    python3 -c "import json,statistics as st; r=[json.loads(l) for l in open('/tmp/loader_$w/metrics.jsonl')]; r=[x for x in r if x.get('step',0)>=6 and 'tokens_per_s' in x]; print('gpu_350m num_workers $w tokens/s', round(st.median(x['tokens_per_s'] for x in r)))" | tee -a "$OUT/loader.txt"
  done
  $B --model 1.3B --out "$OUT/mfu.jsonl" --run peer:mb=12 2>&1 | tail -2 ;;
tests)  # the fast path's tests on the GPU (they skip on CPU-only CI)
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py tests/test_loss.py 2>&1 | tail -4 | tee "$OUT/pytest.txt" ;;
fa4more)  # FA4 vs FA2 in one call: plain causal (rows as documents) vs cuDNN at 1.35B, 374M, the 1B preset
  $B --model 1.3B --budget-s 150 --out "$OUT/mfu.jsonl" --run ours:mb=12,ce=4096,attn=flash_attn \
    --run ours:mb=12,ce=4096,attn=sdpa --run ours:mb=12,ce=4096,attn=flash_attn,fa4=0 2>&1 | grep -v -i "warn\|exe_args" | tail -4
  $B --model 350M --budget-s 100 --out "$OUT/mfu.jsonl" --run ours:mb=32,ce=4096,attn=flash_attn,doc=1,fa4=0 \
    --run ours:mb=32,ce=4096,attn=flash_attn,doc=1 2>&1 | grep -v -i "warn\|exe_args" | tail -3
  $B --model 1B --budget-s 100 --out "$OUT/mfu.jsonl" --run ours:mb=16,ce=4096,attn=flash_attn,doc=1 \
    --run ours:mb=16,ce=4096,attn=flash_attn,doc=1,fa4=0 2>&1 | grep -v -i "warn\|exe_args" | tail -3
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py 2>&1 | tail -2 ;;
fa4parity)  # loss curves: plain, plain-2, fast on FA4, fast on FA2 (needs .carry/data)
  timeout 540 python3 bench/loss_parity.py --data .carry/data/english2048 --out /tmp/parity --steps 300 \
    --runs plain,plain-2,fast,fast-fa2 2>&1 | grep -v -i "warn\|exe_args" | tail -60
  cp /tmp/parity/parity.json "$OUT/" 2>/dev/null ;;
fa4loop)  # the shipped configs through `cptrain train` with FA4 (needs .carry/data)
  loop_configs gpu_1.3b:12 gpu_350m:32 ;;
longctx)  # long sequences on one GPU (docs/long_context.md): the 1B preset at 32K with and without activation
  # checkpointing (MFU), the 8B preset at 128K with offloaded checkpoints and a tiled MLP, the 1B preset at 256K;
  # plain causal rows (one document each), the fused loss; each row records its seq_len
  L="mb=1,ce=8192,attn=flash_attn,doc=0"  # and --mem-cap-gib 78: what fits one 80 GB H100, also on an H200
  B="$B --mem-cap-gib 78"
  timeout 170 $B --seq 32768 --model 1B --steps 3 --warmup 2 --out "$OUT/long.jsonl" --run ours:$L,ac=0 --run ours:$L,ac=1 \
    2>&1 | grep -v -i "warn\|exe_args" | tail -3
  timeout 230 $B --seq 131072 --model 8B --steps 1 --warmup 1 --out "$OUT/long.jsonl" \
    --run ours:$L,ac=1,bf16=1,offload=1,tile=8192 2>&1 | grep -v -i "warn\|exe_args" | tail -2
  timeout 150 $B --seq 262144 --model 1B --steps 1 --warmup 1 --out "$OUT/long.jsonl" \
    --run ours:$L,ac=1,offload=1,tile=8192 2>&1 | grep -v -i "warn\|exe_args" | tail -2 ;;
stash)  # what is over one call's carry, left in /tmp on the warm machine for a later call: FlashAttention-4's
  # compiler library (.carry/fa4a) and the parts of SmolLM2-135M's 98 MB GGUF (.carry/gguf1, .carry/gguf2)
  mkdir -p /tmp/fa4 /tmp/gguf
  [ -f .carry/fa4a/ir.so.xz ] && cp .carry/fa4a/ir.so.xz /tmp/fa4/
  for d in .carry/gguf*; do [ -d "$d" ] && cp "$d"/* /tmp/gguf/; done
  ls -la /tmp/fa4 /tmp/gguf ;;
longctx2)  # after two `stash` calls, carrying .carry/fa4b, .carry/gguf3 and .carry/wheels: the 1B preset at 32K with
  # FlashAttention-4, the 8B preset at 128K with 8-bit AdamW moments (optim.name=adamw8bit); meanwhile, on the CPU,
  # SmolLM2-135M rebuilt as an HF folder in /tmp/hfcache for `extend`
  cp .carry/gguf3/* /tmp/gguf/ && mkdir -p /tmp/smol && cat /tmp/gguf/part.* > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
  CPTRAIN_TEST_CACHE=/tmp/hfcache nice -n 10 python3 -c "from pathlib import Path; from tests.conftest import hf_folder_from_gguf; print(hf_folder_from_gguf('smollm2-135m-q4_1', Path('/tmp/smol'), 'SmolLM2-135M-Instruct.Q4_1.gguf'))" > "$OUT/smol_build.log" 2>&1 &
  smol=$!
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py 2>&1 | tail -2
  L="mb=1,ce=8192,attn=flash_attn,doc=0"
  B="$B --mem-cap-gib 78"
  timeout 150 $B --seq 32768 --model 1B --steps 3 --warmup 2 --out "$OUT/long.jsonl" --run ours:$L,ac=0 --run ours:$L,ac=1 \
    2>&1 | grep -v -i "warn\|exe_args" | tail -3
  timeout 300 $B --seq 131072 --model 8B --steps 1 --warmup 1 --out "$OUT/long.jsonl" \
    --run ours:$L,ac=1,bf16=1,offload=1,tile=8192,opt=adamw8bit 2>&1 | grep -v -i "warn\|exe_args" | tail -2
  wait $smol; tail -2 "$OUT/smol_build.log"; ls -la /tmp/hfcache/smollm2-135m-q4_1 ;;
extend)  # after longctx2, carrying .carry/extend (bench/long_docs.py's data, SmolLM2's tokenizer) and .carry/wheels_data:
  # SmolLM2-135M from its 8,192 window to 32,768 with YaRN (bench/extend_smollm2.yaml), scored before (RoPE left to
  # extrapolate; YaRN without training) and after, by position and by passkey retrieval
  S=/tmp/hfcache/smollm2-135m-q4_1
  cp .carry/extend/tokenizer/* "$S"/  # the tokenizer files the data was prepared with
  for variant in none yarn; do  # the same weights at a 32,768 window, RoPE untouched / YaRN factor 4
    mkdir -p /tmp/smol_$variant && ln -sf "$S"/* /tmp/smol_$variant/ && rm /tmp/smol_$variant/config.json
    python3 -c "import json, sys; c = json.load(open('$S/config.json')); c['max_position_embeddings'] = 32768
if sys.argv[1] == 'yarn': c['rope_parameters'] = {'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 8192, 'rope_theta': c['rope_parameters']['rope_theta']}
json.dump(c, open('/tmp/smol_$variant/config.json', 'w'), indent=1)" $variant
  done
  E="--data .carry/extend/long --max-samples 16 --batch-size 1 --position-buckets 0,2048,8192,16384 --passkey 4096,8192,16384,32768 --passkey-trials 2"
  for variant in none yarn; do
    timeout 100 python3 -m cptrain.launch.cli eval /tmp/smol_$variant $E --json "$OUT/eval_$variant.json" 2>&1 | grep -v -i warn | tail -3
  done
  timeout 330 python3 -m cptrain.launch.cli train bench/extend_smollm2.yaml 2>&1 | grep -v -i warn | tail -6
  cp /tmp/extend_run/metrics.jsonl "$OUT/extend_metrics.jsonl"
  timeout 100 python3 -m cptrain.launch.cli eval /tmp/extend_run $E --tokenizer "$S" --json "$OUT/eval_trained.json" 2>&1 | grep -v -i warn | tail -3 ;;
moe1)  # the OLMoE-1B-7B half of `moe` alone (what fits a call's last five minutes)
  M="ce=4096,attn=flash_attn,doc=1,bf16=1"
  timeout 300 $B --model olmoe-1b-7b --budget-s 230 --out "$OUT/mfu.jsonl" --run ours:mb=4,$M,experts=grouped \
    --run peer:mb=4,bf16=1,experts=grouped_mm --run ours:mb=4,$M,experts=loop 2>&1 | grep -v -i "warn\|exe_args" | tail -5 ;;
cp1)  # the process layout, add-ons and context-parallel plumbing at cp=1: the loop's tokens/s now against
  # commit 6faec7c (before them; carried in .carry/old), same data, configs and call, old and new alternated
  mkdir -p /tmp/oldsite && ln -sfn "$PWD/.carry/old" /tmp/oldsite/cptrain
  for spec in gpu_350m:32:smollm2-135m gpu_1.3b:16:1.3B; do
    IFS=: read -r config mb model <<< "$spec"
    for code in old new new old; do
      site=/tmp/site; [ $code = old ] && site=/tmp/oldsite:/tmp/site
      dir=$PWD; [ $code = old ] && dir=$PWD/.carry/old
      PYTHONPATH=$site timeout 110 python3 -m cptrain.launch.cli train $dir/trainer/configs/$config.yaml --run_dir=/tmp/cp1_$code \
        --overwrite --model.preset=$model "--data.domains=[{name: english, path: $PWD/.carry/data/english2048}]" \
        --train.micro_batch_size=$mb --train.global_batch_tokens=$((mb * 2048)) --train.max_tokens=$((mb * 2048 * 20)) \
        --eval.at_start=false --eval.max_samples=8 --checkpoint.at_end=false --log.progress=false >/dev/null 2>&1
      python3 -c "import json,statistics as st; r=[json.loads(l) for l in open('/tmp/cp1_$code/metrics.jsonl')]; r=[x for x in r if x.get('step',0)>=6 and 'tokens_per_s' in x]; print(json.dumps({'stage': 'cp1', 'code': '$code', 'config': '$config', 'model': '$model', 'mb': $mb, 'seq_len': 2048, 'tokens_per_s': round(st.median(x['tokens_per_s'] for x in r)), 'mfu': round(st.median(x['mfu'] for x in r), 4)}))" | tee -a "$OUT/cp1.jsonl"
    done
  done ;;
moe)  # mixtures of experts on one GPU: ours (grouped GEMM vs the loop over experts) beside transformers' model of the
  # family compiled with its own grouped_mm experts; OLMoE-1B-7B whole, Qwen3-30B-A3B cut to 8 of its 48 layers
  # (5.6B parameters); bf16 parameters and moments (fp32 master weights of 6.9B and their moments do not fit 80 GB)
  python3 -c "import torch; print('grouped_mm', hasattr(torch, '_grouped_mm'), hasattr(torch.nn.functional, 'grouped_mm'))"
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_moe.py -k grouped_gemm 2>&1 | tail -2
  M="ce=4096,attn=flash_attn,doc=1,bf16=1"
  $B --model olmoe-1b-7b --budget-s 250 --out "$OUT/mfu.jsonl" --run peer:mb=4,bf16=1,experts=grouped_mm \
    --run ours:mb=4,$M,experts=grouped --run ours:mb=4,$M,experts=loop --run ours:mb=8,$M,ac=1,experts=grouped 2>&1 \
    | grep -v -i "warn\|exe_args" | tail -6
  $B --model qwen3-30b-a3b --budget-s 250 --out "$OUT/mfu.jsonl" --run peer:mb=4,bf16=1,layers=8,experts=grouped_mm \
    --run ours:mb=4,$M,layers=8,experts=grouped --run ours:mb=4,$M,layers=8,experts=loop \
    --run ours:mb=8,$M,ac=1,layers=8,experts=grouped 2>&1 | grep -v -i "warn\|exe_args" | tail -6 ;;
peers6)  # after `stash` (FA4's compiler library), carrying .carry/fa4b and .carry/peers: the GPU tests, then the 1B rows
  # at seq 2048 (bf16 and FP8 converting every block) against both peers, every row profiled the same way
  # (bench/kernel_profile.py, into $OUT/profiles), and ours with a loss chunk of 8192 tokens
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py 2>&1 | tail -3 | tee "$OUT/pytest.txt"
  P="python3 bench/bench_peers.py --steps 8 --warmup 3 --budget-s ${PEERS_BUDGET:-400} --out $OUT/peers.jsonl --profile-dir $OUT/profiles $TT_SITES"
  $P --run ours:model=1B,mb=16,profile=1,limit=70 --run torchtitan:model=1B,mb=16,profile=1,limit=90 \
    --run olmo-core:model=1B,mb=16,profile=1,limit=90 --run ours:model=1B,mb=16,fp8=tensorwise,keep_ends=0,profile=1,limit=70 \
    --run torchtitan:model=1B,mb=16,fp8=tensorwise,profile=1,limit=90 --run olmo-core:model=1B,mb=16,fp8=tensorwise,profile=1,limit=90 \
    2>&1 | grep -v -i "warn" | tail -8
  timeout 60 python3 bench/bench_mfu.py --model 1B --steps 8 --warmup 3 --out "$OUT/mfu.jsonl" \
    --run ours:mb=16,ce=8192,attn=flash_attn,doc=0 2>&1 | grep -v -i "warn\|exe_args" | tail -2 ;;
peers7)  # after peers6 on the same machine: the 8B shape (bf16 parameters, full activation checkpointing) against both
  # peers, profiled. When it ran (2026-12-06), ours' first row checkpointed by module hooks and the bench_mfu row inside the
  # compiled block (an environment switch of that tree); since 153e4bc the second is the only form, so both rows run it
  P="python3 bench/bench_peers.py --steps 6 --warmup 2 --budget-s ${PEERS_BUDGET:-360} --out $OUT/peers.jsonl --profile-dir $OUT/profiles $TT_SITES"
  $P --run ours:model=8B,mb=2,ac=1,bf16=1,profile=1,limit=100 --run torchtitan:model=8B,mb=2,ac=1,bf16=1,profile=1,limit=120 \
    --run olmo-core:model=8B,mb=2,ac=1,bf16=1,profile=1,limit=120 2>&1 | grep -v -i "warn" | tail -5
  mkdir -p "$OUT/profiles"
  timeout 110 python3 bench/bench_mfu.py --model 8B --steps 6 --warmup 2 --out "$OUT/mfu.jsonl" --profile \
    --run ours:mb=2,ac=1,bf16=1,ce=4096,attn=flash_attn,doc=0 > "$OUT/profiles/ours-8B-acgraph.txt" 2>&1
  tail -2 "$OUT/profiles/ours-8B-acgraph.txt" ;;
peers8)  # after peers7 on the same machine: the 1.35B shape, bf16 and FP8 (every block), against both peers
  P="python3 bench/bench_peers.py --steps 8 --warmup 3 --budget-s ${PEERS_BUDGET:-480} --out $OUT/peers.jsonl --profile-dir $OUT/profiles $TT_SITES"
  $P --run ours:model=1.3B,mb=12,profile=1,limit=70 --run torchtitan:model=1.3B,mb=12,limit=80 --run olmo-core:model=1.3B,mb=12,limit=80 \
    --run ours:model=1.3B,mb=12,fp8=tensorwise,keep_ends=0,limit=70 --run torchtitan:model=1.3B,mb=12,fp8=tensorwise,limit=90 \
    --run olmo-core:model=1.3B,mb=12,fp8=tensorwise,limit=90 2>&1 | grep -v -i "warn" | tail -8 ;;
peers9)  # after `stash`, carrying .carry/fa4b and .carry/peers: with the loss in one pass, the residual stream in bf16 and
  # checkpointing inside the compiled block, the 1B rows (bf16, FP8 every block) and the 8B row against both peers, by
  # priority (the better peer of each shape first), ours profiled
  P="python3 bench/bench_peers.py --steps 8 --warmup 3 --budget-s ${PEERS_BUDGET:-530} --out $OUT/peers.jsonl --profile-dir $OUT/profiles $TT_SITES"
  $P --run ours:model=1B,mb=16,profile=1,limit=60 --run olmo-core:model=1B,mb=16,limit=60 --run torchtitan:model=1B,mb=16,limit=60 \
    --run ours:model=1B,mb=16,fp8=tensorwise,keep_ends=0,profile=1,limit=65 --run torchtitan:model=1B,mb=16,fp8=tensorwise,limit=65 \
    --run ours:model=8B,mb=2,ac=1,bf16=1,profile=1,limit=80 --run torchtitan:model=8B,mb=2,ac=1,bf16=1,limit=90 \
    --run olmo-core:model=1B,mb=16,fp8=tensorwise,limit=65 --run olmo-core:model=8B,mb=2,ac=1,bf16=1,limit=90 \
    2>&1 | grep -v -i "warn" | tail -12
  cd "$OUT/profiles" && tar czf ../profiles9.tgz . && cd - >/dev/null && rm -rf "$OUT/profiles" ;;
peers9b)  # right after peers9 on the same warm machine (FA4 and the peers installed there), with the device time left:
  # the 1.35B shape, bf16 against both peers, then FP8 every block against OLMo-core (the better peer at 1.35B FP8 in peers8)
  P="python3 bench/bench_peers.py --out $OUT/peers.jsonl --torchtitan-site 0.2.2=/tmp/site-torchtitan-0.2.2"
  timeout 175 $P --steps 8 --warmup 3 --budget-s 165 --run ours:model=1.3B,mb=12,limit=55 --run olmo-core:model=1.3B,mb=12,limit=55 \
    --run torchtitan:model=1.3B,mb=12,limit=50 2>&1 | grep -v -i warn | tail -5
  timeout 108 $P --steps 6 --warmup 3 --budget-s 105 --run ours:model=1.3B,mb=12,fp8=tensorwise,keep_ends=0,limit=55 \
    --run olmo-core:model=1.3B,mb=12,fp8=tensorwise,limit=50 2>&1 | grep -v -i warn | tail -4 ;;
moepeers)  # carrying .carry/peers: a mixture of experts against torchtitan 0.2.2's own MoE (its Qwen3 model, grouped_mm experts,
  # dropless, balancing off on both sides), bf16 parameters, micro-batch 4, seq 2048: Qwen3-30B-A3B cut to 8 of its 48 layers
  # (5.6B parameters; torchtitan builds it exactly), then OLMoE-1B-7B (its q/k norm per head, OLMoE's over the whole
  # projection: params_match false). OLMo-core runs no MoE row (bench_peers.py says why). Rows by priority (~560 s in all)
  P="python3 bench/bench_peers.py --steps 8 --warmup 3 --budget-s ${PEERS_BUDGET:-500} --out $OUT/peers.jsonl --torchtitan-site 0.2.2=/tmp/site-torchtitan-0.2.2"
  timeout 530 $P --run ours:model=qwen3-30b-a3b,layers=8,mb=4,bf16=1,limit=110 --run torchtitan:model=qwen3-30b-a3b,layers=8,mb=4,bf16=1,limit=150 \
    --run ours:model=olmoe-1b-7b,mb=4,bf16=1,limit=100 --run torchtitan:model=olmoe-1b-7b,mb=4,bf16=1,limit=130 \
    2>&1 | grep -v -i warn | tail -8 ;;
*) echo "unknown stage $1"; exit 2 ;;
esac
