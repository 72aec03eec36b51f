"""One record per model family: the switches its block fixes, the optional settings its checkpoints
may carry, and how transformers names it, its config.json keys and its tensors. Adding a family is
one entry in FAMILIES: ModelConfig's validation (model/config.py), the config.json adapters
(model/hf_config.py) and the tensor names (model/hf.py) read nothing else.

Plain data, importing nothing of the model, so model/config.py can validate against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# The ModelConfig settings only some families carry, each with the config.json key that holds it.
# A family's `options` names those its models may set; every other one must keep its default.
OPTIONAL = {
    "sliding_window": "sliding_window", "layer_types": "layer_types",
    "rope_local_theta": "rope_local_base_freq",  # Gemma 3: the sliding layers' RoPE base (per layer type)
    "attn_scale_dim": "query_pre_attn_scalar", "attn_softcap": "attn_logit_softcapping",
    "final_softcap": "final_logit_softcapping",
}

# Tensor names: our module path -> transformers', matched on a prefix of the dotted name (the
# parameter's `.weight` / `.bias` follows its module). A `*` segment matches any one segment (a layer's
# index; an expert's, for mixture-of-experts families) and is carried into the `*` of the HF name.
_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_BLOCK = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
          "attention.wo": "self_attn.o_proj", "attention.q_norm": "self_attn.q_norm",
          "attention.k_norm": "self_attn.k_norm", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
          "feed_forward.w2": "mlp.down_proj"}
# HF calls Llama's pre-MLP norm `post_attention_layernorm`; with norms after attention as well (Gemma,
# OLMo 2) that name is the post-attention norm and the MLP's are pre_/post_feedforward_layernorm.
_PRE_NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_SANDWICH_NORMS = {"attention_norm": "input_layernorm", "attention_out_norm": "post_attention_layernorm",
                   "ffn_norm": "pre_feedforward_layernorm", "ffn_out_norm": "post_feedforward_layernorm"}
_POST_NORMS = {"attention_out_norm": "post_attention_layernorm", "ffn_out_norm": "post_feedforward_layernorm"}


# Mixture-of-experts layers: the router, the experts (our [E, out, in] tensors; checkpoints hold one
# tensor per expert, whose index is the HF name's `*` left over, stacked on load and split on save) and
# Qwen2-MoE's gated shared expert. The dense MLP of a layer kept dense keeps _BLOCK's names.
_QWEN_MOE = {"feed_forward.router": "mlp.gate", "feed_forward.experts.w1": "mlp.experts.*.gate_proj.weight",
             "feed_forward.experts.w3": "mlp.experts.*.up_proj.weight",
             "feed_forward.experts.w2": "mlp.experts.*.down_proj.weight",
             "feed_forward.shared.w1": "mlp.shared_expert.gate_proj", "feed_forward.shared.w3": "mlp.shared_expert.up_proj",
             "feed_forward.shared.w2": "mlp.shared_expert.down_proj", "feed_forward.shared_gate": "mlp.shared_expert_gate"}
_MIXTRAL_MOE = {"feed_forward.router": "block_sparse_moe.gate",
                **{f"feed_forward.experts.w{i}": f"block_sparse_moe.experts.*.w{i}.weight" for i in (1, 2, 3)}}


def tensor_names(block: dict[str, str]) -> dict[str, str]:
    """The whole-model table from a block's table (our path inside a block -> HF's inside `model.layers.{i}`)."""
    return {**_TOP, **{f"layers.*.{ours}": f"model.layers.*.{hf}" for ours, hf in block.items()}}


@dataclass(frozen=True)
class MoEKeys:
    """How a mixture-of-experts family's config.json holds ModelConfig's moe_* settings."""
    experts: tuple[str, ...]  # keys of the number of routed experts, any read, the first written (Qwen3-MoE saves either)
    width: str  # key of an expert's width: moe_intermediate_size, or intermediate_size where experts take the dense width
    norm_topk: str | bool  # key of norm_topk_prob, or the value the family fixes (Mixtral always renormalizes)
    dense_layers: bool = False  # mlp_only_layers and decoder_sparse_step keep some layers dense (Qwen MoE)
    shared: bool = False  # a sigmoid-gated shared expert of width shared_expert_intermediate_size (Qwen2-MoE)


@dataclass(frozen=True)
class Family:
    name: str  # ModelConfig.family
    model_type: str  # config.json `model_type`
    architecture: str  # config.json `architectures[0]`
    switches: dict = field(default_factory=dict)  # ModelConfig switches the family fixes (unnamed ones keep their defaults)
    options: frozenset = frozenset()  # keys of OPTIONAL its models may set
    required: dict = field(default_factory=dict)  # config.json keys the decoder implements only at these values
    defaults: dict = field(default_factory=dict)  # config.json values transformers assumes where a key is absent
    # Which layers slide: none; all (one window for every layer, Mistral); window_layers (Qwen:
    # use_sliding_window, layers from max_window_layers on); alternating (Gemma 2: even layers);
    # pattern (Gemma 3: all but every sliding_window_pattern-th). An explicit `layer_types` list wins.
    sliding: Literal["none", "all", "window_layers", "alternating", "pattern"] = "none"
    tensors: dict = field(default_factory=lambda: tensor_names({**_BLOCK, **_PRE_NORMS}))  # our name -> HF's (see tensor_names)
    moe: MoEKeys | None = None  # a mixture-of-experts family: its config.json keys (model/moe.py)


_SILU = {"hidden_act": "silu"}
_GEMMA_SWITCHES = {"norm_placement": "sandwich", "norm_unit_offset": True, "activation": "gelu_tanh", "embed_scale": True}
_GEMMA_OPTIONS = frozenset({"sliding_window", "layer_types", "attn_scale_dim", "attn_softcap", "final_softcap"})
_GEMMA_REQUIRED = {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False}
_GEMMA_DEFAULTS = {"tie_word_embeddings": True, "query_pre_attn_scalar": 256}
_QWEN_OPTIONS = frozenset({"sliding_window", "layer_types"})

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "llama", "LlamaForCausalLM", required={**_SILU, "attention_bias": False, "mlp_bias": False}),
    Family("mistral", "mistral", "MistralForCausalLM", options=frozenset({"sliding_window"}), required=_SILU, sliding="all"),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", switches={"qkv_bias": True}, options=_QWEN_OPTIONS, required=_SILU,
           sliding="window_layers"),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", switches={"qk_norm": "head"}, options=_QWEN_OPTIONS,
           required={**_SILU, "attention_bias": False}, sliding="window_layers"),
    Family("gemma2", "gemma2", "Gemma2ForCausalLM", switches=_GEMMA_SWITCHES, options=_GEMMA_OPTIONS,
           required=_GEMMA_REQUIRED, defaults=_GEMMA_DEFAULTS, sliding="alternating",
           tensors=tensor_names({**_BLOCK, **_SANDWICH_NORMS})),
    Family("gemma3", "gemma3_text", "Gemma3ForCausalLM", switches={**_GEMMA_SWITCHES, "qk_norm": "head"},
           options=_GEMMA_OPTIONS | {"rope_local_theta"},
           required={**_GEMMA_REQUIRED, "use_bidirectional_attention": False},
           defaults={**_GEMMA_DEFAULTS, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                     "sliding_window_pattern": 6},
           sliding="pattern", tensors=tensor_names({**_BLOCK, **_SANDWICH_NORMS})),
    Family("olmo2", "olmo2", "Olmo2ForCausalLM", switches={"qk_norm": "full", "norm_placement": "post"},
           required={**_SILU, "attention_bias": False}, tensors=tensor_names({**_BLOCK, **_POST_NORMS})),
    # Mixtures of experts. transformers keeps each layer's experts fused in memory (gate_up_proj) but
    # save_pretrained and the hub's checkpoints hold one tensor per expert, which is what is read and written.
    # Qwen MoE's sliding windows (every layer, or every other one, by use_sliding_window) are not those of
    # the dense Qwen families; the released checkpoints use none.
    Family("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", switches={"qk_norm": "head"},
           required={**_SILU, "attention_bias": False, "use_sliding_window": False}, defaults={"router_aux_loss_coef": 0.001},
           tensors=tensor_names({**_BLOCK, **_PRE_NORMS, **_QWEN_MOE}),
           moe=MoEKeys(("num_experts", "num_local_experts"), "moe_intermediate_size", "norm_topk_prob", dense_layers=True)),
    Family("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", switches={"qkv_bias": True},
           required={**_SILU, "qkv_bias": True, "use_sliding_window": False}, defaults={"router_aux_loss_coef": 0.001},
           tensors=tensor_names({**_BLOCK, **_PRE_NORMS, **_QWEN_MOE}),
           moe=MoEKeys(("num_experts",), "moe_intermediate_size", "norm_topk_prob", dense_layers=True, shared=True)),
    Family("olmoe", "olmoe", "OlmoeForCausalLM", switches={"qk_norm": "full"},
           required={**_SILU, "attention_bias": False, "clip_qkv": None}, defaults={"router_aux_loss_coef": 0.01},
           tensors=tensor_names({**_BLOCK, **_PRE_NORMS, **_QWEN_MOE}),
           moe=MoEKeys(("num_experts",), "intermediate_size", "norm_topk_prob")),
    Family("mixtral", "mixtral", "MixtralForCausalLM", options=frozenset({"sliding_window"}),
           required={**_SILU, "router_jitter_noise": 0.0}, defaults={"router_aux_loss_coef": 0.001}, sliding="all",
           tensors=tensor_names({**_BLOCK, **_PRE_NORMS, **_MIXTRAL_MOE}),
           moe=MoEKeys(("num_local_experts",), "intermediate_size", True)),
)}
