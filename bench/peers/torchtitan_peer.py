"""torchtitan's own trainer on one device: its Llama 3 model at our shape, built, parallelized
(`parallelize_llama`: activation checkpointing -> per-block torch.compile -> FSDP/mixed precision),
converted to float8 and trained by its `Trainer.train_step` (zero_grad, forward/backward with its
loss, clip_grad_norm_, optimizer and LR-scheduler step). Only the data and the tokenizer are ours:
a loader of random tokens through the trainer's own extension points. Run by bench/bench_peers.py.

Two releases, two APIs: 0.3 (Trainer.Config of Configurable components, Llama3Model.Config; needs
torch 2.13, the first stable torch its maintainers promise a matching release for) and 0.2 (JobConfig
and TrainSpec; 0.2.1/0.2.2 date from the torch 2.10-2.11 releases). The installed one is used.

Settings, torchtitan's defaults and the fast settings of its Llama 3 recipes and docs:
- compile: `compile.enable`, components model (per block) and loss.
- attention: 0.3 `flex` (its default; `varlen` asks for FlashAttention-3 on Hopper), block-causal
  from positions that run 0..S-1 in every row, i.e. plain causal; 0.2 `sdpa` causal (its default).
- loss: 0.3 `ChunkedLossWrapper(CrossEntropyLoss)` (its recipes' fused chunked head + loss); 0.2 the
  compiled cross-entropy of `build_cross_entropy_loss`.
- optimizer: AdamW fused (its default implementation), lr 1e-4, betas (0.9, 0.95), eps 1e-8, wd 0.1;
  max_norm 1.0. Mixed precision: fp32 parameters, bf16 compute (`mixed_precision_param`), fp32
  reduce; `bf16=1`: `training.dtype=bfloat16` (parameters, gradients and optimizer state in bf16).
- activation checkpointing: off, or `ac=1` full (its recipes default to selective AC, a memory
  saver that recomputes; off where the batch fits, as ours runs).
- fp8: 0.3 `Float8LinearConverter` rowwise (its only float8 recipes are rowwise), 0.2
  `model.converters=["quantize.linear.float8"]` tensorwise (its default recipe); the LM head stays bf16 in both.
- CUDA graphs of the forward/backward: 0.3's default (on); 0.2 has none.

Mixtures of experts (0.2 only): its Qwen3 model with `moe_enabled` (models/qwen3, models/moe), the
model of its 30B-A3B flavor, at the preset's numbers (dim, layers cut by `layers`, heads, head width,
experts, top-k, expert width, RoPE base, norm eps):
- router: `TokenChoiceTopKRouter`, the preset's score (softmax, or sigmoid) in fp32, top-k weights
  renormalized where the preset's are (`route_norm` = norm_topk_prob; OLMoE's are not), applied to
  the experts' outputs as ours (`score_before_experts=False`); no shared expert.
- experts: `GroupedExperts` through `torch._grouped_mm` (bf16; its token groups padded to 8 rows by
  its Triton permutation kernel, compiled with the blocks by `apply_compile`), dropless; on a CPU its
  loop over experts (`use_grouped_mm=False`: the Triton kernel has no CPU path).
- balancing: off, as in ours' timed step (bench_mfu.py adds the router losses at weight 0):
  `load_balance_coeff=None` (no expert-bias updates); 0.2 has no auxiliary loss.
- q/k norm: per head (RMSNorm over head_dim, Qwen3's) or none. OLMoE normalizes q and k over the whole
  projection, which its Qwen3 cannot: the olmoe-1b-7b row builds per-head norms, says so in its
  options, and its params_match is false (2 x 16 x (2048 - 128) fewer norm weights at 16 layers).
- every layer is MoE (no dense layers: presets with them are cut below the first by `layers`).
0.3's MoE (models/common/moe.py) is not wired here: its rows fail over to a 0.2 release.
"""
from __future__ import annotations

import types

import peer_step

DUMP = "/tmp/torchtitan_peer"


def cpu_device_module() -> types.SimpleNamespace:
    """torchtitan assumes an accelerator (torch.cuda's memory statistics, set_device): on a CPU
    smoke run, this stands in for torch.cuda (zero memory, no-op device calls)."""
    props = types.SimpleNamespace(total_memory=1 << 40, name="cpu")
    return types.SimpleNamespace(
        set_device=lambda *a: None, current_device=lambda: 0, device_count=lambda: 1, is_available=lambda: True,
        get_device_name=lambda *a: "cpu", get_device_properties=lambda *a: props, memory_stats=lambda *a: {},
        reset_peak_memory_stats=lambda *a: None, empty_cache=lambda: None, synchronize=lambda *a: None,
        max_memory_allocated=lambda *a: 0, max_memory_reserved=lambda *a: 0, manual_seed=lambda *a: None,
        manual_seed_all=lambda *a: None)


def _on_device(device) -> None:
    """On a CPU, make torchtitan's device probe (torch._utils, read when torchtitan is first imported)
    answer "cpu" with the stand-in above, and let torch.histc count integers (its MoE router counts the
    tokens per expert with histc over int64 expert ids, which only CUDA implements; the counts through a
    float copy are the same); on a GPU nothing changes."""
    if device.type != "cpu":
        return
    import torch
    import torch._utils

    shim, probe = cpu_device_module(), torch._utils._get_device_module
    torch._utils._get_available_device_type = lambda: "cpu"
    torch._utils._get_device_module = lambda kind=None: shim if kind == "cpu" else probe(kind)
    histc = torch.histc

    def histc_any(x, *args, **kwargs):
        if x.is_floating_point():
            return histc(x, *args, **kwargs)
        return histc(x.float(), *args, **kwargs).to(x.dtype)
    torch.histc = histc_any


def random_loader_class(base, spec: dict, positions: bool):
    """A torchtitan data loader of random tokens: ({"input": x[, "positions": p]}, labels)."""
    import torch

    batches = peer_step.random_tokens(spec, 4)
    pos = torch.arange(spec["seq"]).expand(spec["mb"], -1).contiguous()  # one document per row

    class RandomTokens(base):
        def __iter__(self):
            i = 0
            while True:
                b = batches[i % len(batches)]
                inputs = {"input": b[:, :-1]}
                if positions:  # 0.3's masked backends build their block-causal mask from these
                    inputs["positions"] = pos
                yield inputs, b[:, 1:]
                i += 1

        def state_dict(self):
            return {}

        def load_state_dict(self, state_dict):
            pass
    return RandomTokens


def build(spec: dict, device):
    import torch
    from importlib.metadata import version

    peer_step.single_process_env()
    _on_device(device)
    v = version("torchtitan")
    trainer, options = (_trainer_v03 if v.startswith("0.3") else _trainer_v02)(spec, device)
    data = trainer.batch_generator(trainer.dataloader)

    def step():
        trainer.step += 1
        trainer.gc_handler.run(trainer.step)
        trainer.train_step(data)

    first = {}
    log = trainer.metrics_processor.log

    def log_first(step_no, avg_loss, max_loss, grad_norm, **kwargs):  # the loop logs step 1 (log_freq is huge)
        first.setdefault("loss_step1", round(float(avg_loss), 4))
        return log(step_no, avg_loss, max_loss, grad_norm, **kwargs)

    trainer.metrics_processor.log = log_first
    model = trainer.model_parts[0]
    params = sum(p.numel() for p in model.parameters())
    n_f8 = sum("Float8Linear" in type(m).__name__ for m in model.modules())
    torch.manual_seed(0)
    return step, {"version": v, "options": options, "params": params, "float8_linears": n_f8, "after": lambda: first}


def _model_config_v03(spec: dict):
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import (
        _EMBEDDING_INIT,
        _EMBEDDING_SKIP_INIT,
        _NORM_INIT,
        Llama3Model,
        _build_llama3_layers,
        _output_linear_init,
    )

    s = spec["shape"]
    d, vocab, scaling = s["dim"], s["vocab_size"], s.get("rope_scaling") or {}
    rope = ComplexRoPE.Config(dim=d // s["n_heads"], max_seq_len=max(spec["seq"], 8192), theta=s["rope_theta"],
                              scaling="llama" if scaling.get("rope_type") == "llama3" else "none",
                              scaling_factor=scaling.get("factor", 8.0))
    layers = _build_llama3_layers(n_layers=s["n_layers"], dim=d, n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                                  hidden_dim=s["ffn_dim"], rope=rope, attn_backend="flex")
    if spec["attn"] == "sdpa":  # its causal SDPA module (FlexAttention has no backward on a CPU)
        for layer in layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    elif spec["attn"] not in ("", "flex"):
        raise ValueError(f"attn={spec['attn']}: this harness runs torchtitan 0.3 with flex or sdpa")
    # As torchtitan's own flavors (models/llama3/__init__.py _1b, _8b) are written, at our numbers.
    return Llama3Model.Config(
        dim=d, vocab_size=vocab, enable_weight_tying=s["tie_embeddings"],
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=d,
                                        param_init=_EMBEDDING_SKIP_INIT if s["tie_embeddings"] else _EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=d, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=d, out_features=vocab, param_init=_output_linear_init(d)), layers=layers)


def _data_v03(spec: dict):
    """(loader config, tokenizer config): 0.3's Trainer builds both from Configurable configs."""
    from dataclasses import dataclass

    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.components.tokenizer import BaseTokenizer

    RandomTokens = random_loader_class(BaseDataLoader, spec, positions=spec["attn"] != "sdpa")

    class RandomLoader(RandomTokens):
        @dataclass(kw_only=True, slots=True)
        class Config(BaseDataLoader.Config):
            pass

        def __init__(self, config, **kwargs):
            del config, kwargs  # the trainer's dp rank/size, tokenizer, seq_len, batch size: fixed by the spec

    class NoTokenizer(BaseTokenizer):
        """torchtitan 0.3's Trainer always builds a tokenizer and asks it the vocabulary size; the loader
        above feeds token ids, so no text is ever encoded or decoded (BaseTokenizer declares both
        abstract, hence the two methods that refuse)."""
        @dataclass(kw_only=True, slots=True)
        class Config(BaseTokenizer.Config):
            pass

        def __init__(self, config, **kwargs):
            super().__init__()

        def encode(self, *args, **kwargs):
            raise RuntimeError("the torchtitan peer trains on random token ids; it has no text to encode")

        def decode(self, *args, **kwargs):
            raise RuntimeError("the torchtitan peer trains on random token ids; it has no text to decode")

        def get_vocab_size(self):
            return spec["shape"]["vocab_size"]
    return RandomLoader.Config(), NoTokenizer.Config()


def _trainer_v03(spec: dict, device):
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.components.quantization import Float8LinearConverter
    from torchtitan.config import CompileConfig, TrainingConfig
    from torchtitan.distributed.activation_checkpoint import FullAC
    from torchtitan.models.llama3 import parallelize_llama
    from torchtitan.protocols.model_spec import ModelSpec
    from torchtitan.trainer import Trainer

    if "experts" in spec["shape"]:
        raise ValueError("mixtures of experts are wired for torchtitan 0.2 (models/qwen3 with models/moe); run a 0.2 release")
    model, (loader, tokenizer) = _model_config_v03(spec), _data_v03(spec)
    compiled = bool(spec["compile"])
    if spec["fp8"] != "off":
        if spec["fp8"] == "tensorwise":
            raise ValueError("torchtitan 0.3's Float8LinearConverter has rowwise recipes only; run fp8=rowwise")
        conv = Float8LinearConverter.Config(recipe_name=spec["fp8"], filter_fqns=["lm_head"],
                                            emulate=device.type == "cpu", model_compile_enabled=compiled)
        model = conv.build().convert(model)
    config = Trainer.Config(
        model_spec=ModelSpec(name="llama3", flavor=spec["model"], model=model, parallelize_fn=parallelize_llama,
                             pipelining_fn=None, post_optimizer_build_fn=None, state_dict_adapter=None),
        dump_folder=DUMP, tokenizer=tokenizer, dataloader=loader,
        loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=spec["shape"]["vocab_size"])),
        optimizer=default_adamw(lr=1e-4), metrics=MetricsProcessor.Config(log_freq=10**9),
        training=TrainingConfig(local_batch_size=spec["mb"], seq_len=spec["seq"], steps=10**9, max_norm=1.0,
                                dtype="bfloat16" if spec["bf16"] else "float32",
                                disable_cuda_graphs=device.type != "cuda"),
        compile=CompileConfig(enable=compiled, components=["model", "loss"]),
        activation_checkpoint=FullAC.Config() if spec["ac"] else None)
    attn = "sdpa causal" if spec["attn"] == "sdpa" else "flex block-causal, one document per row"
    options = [f"attn={attn}",
               "loss=ChunkedLossWrapper(CrossEntropyLoss)", f"compile={'model+loss' if compiled else 'off'}",
               f"params {'bf16' if spec['bf16'] else 'fp32, bf16 compute'}", "AdamW fused lr1e-4 b(0.9,0.95) wd0.1 clip1.0",
               f"ac={'full' if spec['ac'] else 'off'}", f"cuda graphs={'on' if device.type == 'cuda' else 'off'}"]
    if spec["fp8"] != "off":
        options.append(f"fp8=Float8LinearConverter {spec['fp8']}, lm_head bf16")
    return Trainer(config), "; ".join(options)


def _llama_v02(spec: dict, device):
    """(train spec, model args at our shape, the model's words for the options) of 0.2's Llama 3."""
    from torchtitan.models.llama3 import get_train_spec
    from torchtitan.models.llama3.model.args import RoPEScalingArgs, TransformerModelArgs

    s = spec["shape"]
    scaling = s.get("rope_scaling") or {}
    # multiple_of = ffn_dim makes its SwiGLU width rule (int(8 dim / 3) rounded up) land on ffn_dim.
    args = TransformerModelArgs(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                                vocab_size=s["vocab_size"], multiple_of=s["ffn_dim"], norm_eps=s["norm_eps"],
                                rope_theta=s["rope_theta"], attn_type=spec["attn"] or "sdpa",
                                rope_scaling_args=RoPEScalingArgs(scaling_factor=scaling.get("factor", 8.0)))
    return get_train_spec(), args, ["tied head" if s["tie_embeddings"] else "untied head"]


def _moe_v02(spec: dict, device):
    """(train spec, model args, the model's words) of 0.2's Qwen3 with every layer a mixture of experts,
    set as its 30B-A3B flavor is but at our numbers: softmax (or sigmoid) router, top-k weights
    renormalized where ours are, applied to the experts' outputs (score_before_experts off), no shared
    expert, dropless; load balancing off as in ours' timed step (no expert-bias updates; 0.2 has no
    auxiliary loss); q/k norm per head, or none."""
    from torchtitan.models.moe import MoEArgs
    from torchtitan.models.qwen3 import get_train_spec
    from torchtitan.models.qwen3.model.args import Qwen3ModelArgs

    s = spec["shape"]
    kernel = spec["experts"] or ("grouped" if device.type == "cuda" else "loop")  # its permute kernel is Triton
    moe = MoEArgs(num_experts=s["experts"], num_shared_experts=0, top_k=s["top_k"], score_func=s["router"],
                  route_norm=s["norm_topk"], route_scale=1.0, score_before_experts=False,
                  use_grouped_mm=kernel == "grouped", load_balance_coeff=None)
    args = Qwen3ModelArgs(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                          vocab_size=s["vocab_size"], head_dim=s["head_dim"], hidden_dim=s["ffn_dim"],
                          norm_eps=s["norm_eps"], rope_theta=s["rope_theta"], qk_norm=s["qk_norm"] != "none",
                          max_seq_len=spec["seq"], attn_type=spec["attn"] or "sdpa",
                          enable_weight_tying=s["tie_embeddings"], moe_enabled=True, moe_inter_dim=s["expert_dim"],
                          moe_args=moe)
    qk = {"none": "no q/k norm", "head": "q/k norm per head",
          "full": "q/k norm per head (NOT as the preset: over the whole projection; its Qwen3 has no such norm)"}
    words = [f"model=Qwen3 MoE, {s['experts']} experts top-{s['top_k']} width {s['expert_dim']}, every layer",
             f"experts={'torch._grouped_mm' if kernel == 'grouped' else 'loop over experts'}",
             f"router={s['router']}, top-k {'renormalized' if s['norm_topk'] else 'not renormalized'}, "
             "weights on expert outputs", "dropless", "no shared expert",
             "balancing off (load_balance_coeff None, no aux loss)", qk[s["qk_norm"]],
             "tied head" if s["tie_embeddings"] else "untied head"]
    return get_train_spec(), args, words


def _trainer_v02(spec: dict, device):
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.config import ConfigManager
    from torchtitan.protocols.train_spec import register_train_spec
    from torchtitan.train import Trainer

    import dataclasses

    s = spec["shape"]
    moe = "experts" in s
    train_spec, args, model_words = (_moe_v02 if moe else _llama_v02)(spec, device)
    RandomTokens = random_loader_class(BaseDataLoader, spec, positions=False)

    def optimizers_tied(model_parts, *a, **k):
        if s["tie_embeddings"] and not moe:  # 0.2's Llama has no tying switch: share the weights before the optimizer sees them
            model_parts[0].output.weight = model_parts[0].tok_embeddings.weight
        return build_optimizers(model_parts, *a, **k)

    name = ("qwen3_moe" if moe else "llama3") + "_random_tokens"
    register_train_spec(name, dataclasses.replace(
        train_spec, model_args={**train_spec.model_args, spec["model"]: args}, build_tokenizer_fn=None,
        build_dataloader_fn=lambda **kw: RandomTokens(), build_optimizers_fn=optimizers_tied, build_validator_fn=None))
    cli = [f"--job.dump_folder={DUMP}", f"--model.name={name}", f"--model.flavor={spec['model']}",
           f"--training.local_batch_size={spec['mb']}", f"--training.seq_len={spec['seq']}", "--training.steps=1000000000",
           "--training.max_norm=1.0", f"--training.dtype={'bfloat16' if spec['bf16'] else 'float32'}",
           "--optimizer.name=AdamW", "--optimizer.lr=1e-4", "--optimizer.weight_decay=0.1", "--metrics.log_freq=1000000000",
           f"--activation_checkpoint.mode={'full' if spec['ac'] else 'none'}"]
    if spec["compile"]:
        cli += ["--compile.enable", "--compile.components=model,loss"]  # its lists are comma-separated
    if spec["fp8"] != "off":
        cli += ["--model.converters=quantize.linear.float8", f"--quantize.linear.float8.recipe_name={spec['fp8']}",
                "--quantize.linear.float8.filter_fqns=output"]
        if device.type == "cpu":
            cli.append("--quantize.linear.float8.emulate")
    options = [f"attn={args.attn_type} causal", "loss=cross_entropy_loss" + (" compiled" if spec["compile"] else ""),
               f"compile={'model+loss' if spec['compile'] else 'off'}",
               f"params {'bf16' if spec['bf16'] else 'fp32, bf16 autocast'}", "AdamW fused lr1e-4 b(0.9,0.95) wd0.1 clip1.0",
               f"ac={'full' if spec['ac'] else 'off'}", *model_words]
    if spec["fp8"] != "off":
        options.append(f"fp8=quantize.linear.float8 {spec['fp8']}, output bf16")
    return Trainer(ConfigManager().parse_args(cli)), "; ".join(options)


if __name__ == "__main__":
    raise SystemExit(peer_step.run("torchtitan", build))
