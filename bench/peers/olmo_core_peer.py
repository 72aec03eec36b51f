"""OLMo-core's own training step on one device: its Llama-style `TransformerConfig` at our shape and its
`TransformerTrainModule` (compile, FSDP2 on one rank, fused AdamW, clipping, torchao float8), called
as its Trainer calls it: `train_batch(batch); optim_step(); zero_grads()`. Run by bench/bench_peers.py.

Settings, as OLMo-core's official Llama3-8B / OLMo-2 training scripts set them (src/scripts/train/):
- model: `TransformerConfig.llama_like` with the shape's width, depth, heads, kv heads, FFN width,
  RoPE base (and Llama-3 stepwise RoPE scaling), tied or untied head; built on the meta device.
- attention: `AttentionBackendName.torch` (torch SDPA, causal; FlashAttention-2 inside torch on
  Hopper) unless `attn` names another (flash_2/flash_3/flash_4/te need packages the GPU image lacks).
- loss: the LM head's `default` (torch cross-entropy on fp32 logits, compiled with the head), or
  `loss=fused_linear` (Liger-Kernel's fused linear cross-entropy, OLMo-core's fused loss); no z-loss.
- train module: compile_model=True (torch.compile per block and the head), FSDP2 over one rank with
  bf16 parameters and fp32 reduction (fp32 master weights and AdamW state), AdamW(lr 1e-4, betas
  (0.9, 0.95), wd 0.1, fused), max_grad_norm 1.0; `ac=1`: full activation checkpointing;
  `bf16=1`: parameters, gradients and AdamW state in bf16 (the model's dtype), for 8B on one GPU.
- fp8: `Float8Config(ao=AOFloat8LinearConfig.recommended())`: torchao Float8Linear, tensorwise
  dynamic scaling with power-of-two scales, FP8 all-gather; the LM head stays bf16 (OLMo-core's rule).
The Trainer (data loader, callbacks, checkpointer) is replaced by the small object below that keeps
the metrics the train module records; automatic GC is off in the loop as its GC callback does.
"""
from __future__ import annotations

import peer_step


class MetricsSink:
    """What TransformerTrainModule touches of olmo_core.train.Trainer inside a step."""

    def __init__(self, device, global_batch_size: int, dp_process_group):
        self.device = device
        self.global_batch_size = global_batch_size  # tokens, as OLMo-core counts it
        self.dp_process_group = dp_process_group
        self.global_step = 0
        self.metrics = {}

    def record_metric(self, name, value, reduce_type=None, namespace=None, merge_strategy=None):
        self.metrics[f"{namespace.rstrip('/')}/{name.lstrip('/')}" if namespace else name] = value

    def record_ce_loss(self, value, reduce_type=None):
        self.record_metric("train/CE loss", value, reduce_type)


def model_config(spec: dict):
    from olmo_core.config import DType
    from olmo_core.nn.attention import AttentionBackendName
    from olmo_core.nn.feed_forward import FeedForwardConfig
    from olmo_core.nn.lm_head import LMLossImplementation
    from olmo_core.nn.rope import StepwiseRoPEScalingConfig
    from olmo_core.nn.transformer import TransformerConfig

    s = spec["shape"]
    dtype = DType.bfloat16 if spec["bf16"] else DType.float32
    scaling = s.get("rope_scaling") or {}
    rope_scaling = None
    if scaling.get("rope_type") == "llama3":
        rope_scaling = StepwiseRoPEScalingConfig(factor=scaling["factor"],
                                                 old_context_len=scaling["original_max_position_embeddings"])
    cfg = TransformerConfig.llama_like(
        d_model=s["dim"], vocab_size=s["vocab_size"], n_layers=s["n_layers"], n_heads=s["n_heads"],
        n_kv_heads=None if s["n_kv_heads"] == s["n_heads"] else s["n_kv_heads"], layer_norm_eps=s["norm_eps"],
        rope_theta=s["rope_theta"], rope_scaling=rope_scaling, attn_backend=AttentionBackendName(spec["attn"] or "torch"),
        feed_forward=FeedForwardConfig(hidden_size=s["ffn_dim"], bias=False, dtype=dtype), dtype=dtype,
        tie_word_embeddings=s["tie_embeddings"])
    cfg.lm_head.loss_implementation = LMLossImplementation(spec["loss"] or "default")
    return cfg


def train_module_config(spec: dict, device):
    from olmo_core.config import DType
    from olmo_core.distributed.parallel import DataParallelType
    from olmo_core.optim import AdamWConfig
    from olmo_core.train.train_module import (
        TransformerActivationCheckpointingConfig,
        TransformerDataParallelConfig,
        TransformerTrainModuleConfig,
    )

    float8 = None
    if spec["fp8"] != "off":
        if spec["fp8"] != "tensorwise":
            raise ValueError(f"fp8={spec['fp8']}: OLMo-core's recommended float8 recipe is tensorwise")
        from olmo_core.float8 import AOFloat8LinearConfig, Float8Config

        emulate = {"emulate": True} if device.type == "cpu" else {}  # no FP8 matmul on a CPU
        float8 = Float8Config(enabled=True, ao=AOFloat8LinearConfig.recommended(**emulate))
    return TransformerTrainModuleConfig(
        rank_microbatch_size=spec["mb"] * spec["seq"], max_sequence_length=spec["seq"],
        optim=AdamWConfig(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True),
        max_grad_norm=1.0, compile_model=bool(spec["compile"]), float8_config=float8,
        dp_config=TransformerDataParallelConfig(name=DataParallelType.fsdp, param_dtype=DType.bfloat16,
                                                reduce_dtype=DType.float32),
        ac_config=TransformerActivationCheckpointingConfig() if spec["ac"] else None)  # mode: full


def build(spec: dict, device):
    import torch
    from importlib.metadata import version

    from olmo_core.train import prepare_training_environment

    # OLMo-core starts a world of one process itself when no launcher set one up.
    prepare_training_environment(seed=0, backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    cfg = model_config(spec)
    model = cfg.build(init_device="meta")
    tm = train_module_config(spec, device).build(model, device=device)
    sink = MetricsSink(device, spec["mb"] * spec["seq"], tm.dp_process_group)
    tm._attach_trainer(sink)  # as Trainer.__post_init__ does
    tm.pre_train()  # batch-size checks, as Trainer.fit does
    tm.zero_grads()
    batches = [b[:, :spec["seq"]].to(device) for b in peer_step.random_tokens(spec, 4)]

    first = {}

    def step():
        sink.global_step += 1
        tm.train_batch({"input_ids": batches[sink.global_step % 4]})
        tm.optim_step()
        tm.zero_grads()
        if sink.global_step == 1:  # a device tensor; read once the timing is over
            first["loss"] = sink.metrics.get("train/CE loss")

    def after():
        loss = first.get("loss")
        return {"loss_step1": round(float(loss), 4) if loss is not None else None}

    compiled = bool(getattr(tm.model, "compile_enabled", False))
    n_f8 = sum(type(m).__name__ == "Float8Linear" for m in tm.model.modules())
    options = [f"attn={cfg.block.sequence_mixer.backend or 'torch'}", f"loss={cfg.lm_head.loss_implementation}, no z-loss",
               f"compile={'blocks+lm_head' if compiled else 'off'}", "FSDP2 world=1 param bf16 reduce fp32",
               f"params {'bf16' if spec['bf16'] else 'fp32 master'}", "AdamW fused lr1e-4 b(0.9,0.95) wd0.1 clip1.0",
               f"ac={'full' if spec['ac'] else 'off'}"]
    if n_f8:
        options.append("fp8=torchao tensorwise, pow2 scales, fp8 all-gather, head bf16")
    info = {"version": version("ai2-olmo-core"), "options": "; ".join(options), "float8_linears": n_f8,
            "params": sum(p.numel() for p in tm.model.parameters()), "after": after}
    torch.manual_seed(0)
    return step, info


if __name__ == "__main__":
    raise SystemExit(peer_step.run("olmo-core", build))
