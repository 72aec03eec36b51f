"""Mixtures of experts: every MoE family against transformers on tiny random configs (logits and the
family's load-balancing loss), lossless import/export of per-expert checkpoints, grouped GEMM against
the loop over experts, token sorting and capacity against a token-by-token reference, presets against
the released checkpoints' parameter counts, one-line refusals."""
import dataclasses
import json
import math
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file

from cptrain.errors import UserError
from cptrain.model.config import ModelConfig, flops_per_token, param_counts
from cptrain.model.decoder import Decoder
from cptrain.model.hf import load_hf_dir, save_hf_dir
from cptrain.model.hf_config import from_hf_config, to_hf_config
from cptrain.model.mlp import gated
from cptrain.model.moe import (Experts, LocalDispatch, MoE, group_by_expert, grouped_mlps, looped_mlps, route,
                               router_losses, unpack_stats)
from cptrain.model.presets import preset

pytestmark = pytest.mark.moe

SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, rms_norm_eps=1e-6)
# HF-side configs in HF's own terms, so the config conversion is under test too: renormalized or not, a
# dense layer among MoE ones (Qwen3-MoE), a shared expert (Qwen2-MoE), q/k norms per head or whole.
TINY = {
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(num_hidden_layers=3, head_dim=32, num_experts=6, num_experts_per_tok=2,
                                                    moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(num_hidden_layers=2, num_experts=6, num_experts_per_tok=3,
                                                    moe_intermediate_size=40, shared_expert_intermediate_size=56)),
    "olmoe": (transformers.OlmoeConfig, dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, eos_token_id=2)),
    "mixtral": (transformers.MixtralConfig, dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                                 router_aux_loss_coef=0.02)),
}


def tiny_hf_model(kind: str):
    config_cls, extra = TINY[kind]
    config = config_cls(**SHAPE, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # router, expert and norm weights all moved off their initial values
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def ours(path) -> Decoder:
    cfg, sd = load_hf_dir(path)
    with torch.device("meta"):
        model = Decoder(cfg)
    model.load_state_dict(sd, assign=True)
    return model.eval()


def batch(vocab: int = 320, b: int = 2, s: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=list(TINY))
def hf_folder(request, tmp_path):
    model = tiny_hf_model(request.param)
    model.save_pretrained(tmp_path / "hf")
    return request.param, tmp_path / "hf", model


@torch.no_grad()
def test_logits_and_balancing_loss_match_transformers(hf_folder):
    kind, path, hf = hf_folder
    t = batch()
    ref = hf(t, output_router_logits=True)
    model = ours(path)
    assert model.cfg.family == kind and model.cfg.n_experts == len(hf.model.layers[0].mlp.experts.gate_up_proj)
    aux = {}
    logits = model(t, aux=aux)
    assert ref.logits.abs().max() > 1
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=2e-5)
    balance, z = router_losses(aux["router"])
    assert aux["router"].shape[0] == sum(model.cfg.moe_layers) == len(ref.router_logits)
    torch.testing.assert_close(balance, ref.aux_loss, rtol=1e-5, atol=0)
    expected_z = torch.stack([torch.logsumexp(r.float(), -1).square().mean() for r in ref.router_logits]).mean()
    torch.testing.assert_close(z, expected_z, rtol=1e-5, atol=0)  # equal token counts per layer: mean of means
    # transformers' training loss adds router_aux_loss_coef times the same balancing loss
    labels = hf(t, labels=t, output_router_logits=True)
    assert model.cfg.moe_aux_loss_coef == hf.config.router_aux_loss_coef
    lm = labels.loss - hf.config.router_aux_loss_coef * labels.aux_loss
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), t[:, 1:].flatten())
    torch.testing.assert_close(ce, lm, rtol=1e-5, atol=0)


@torch.no_grad()
def test_import_export_is_lossless(hf_folder, tmp_path):
    kind, path, hf = hf_folder
    cfg, sd = load_hf_dir(path)
    assert sd["layers.0.feed_forward.experts.w1"].shape == (cfg.n_experts, cfg.moe_ffn_dim, cfg.dim)
    save_hf_dir(cfg, sd, tmp_path / "out")
    original, exported = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "out/model.safetensors"))
    assert original.keys() == exported.keys()  # one tensor per expert, as save_pretrained writes them
    assert all(torch.equal(original[k], exported[k]) for k in original)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded) is type(hf)
    t = batch()
    assert torch.equal(reloaded(t).logits, hf(t).logits)
    assert load_hf_dir(tmp_path / "out")[0] == cfg


def _experts(e=5, d=16, f=24, seed=0) -> Experts:
    cfg = ModelConfig(family="mixtral", dim=d, ffn_dim=f, n_experts=e, moe_top_k=2, moe_ffn_dim=f, moe_norm_topk=True)
    experts = Experts(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in (experts.w1, experts.w3, experts.w2):
            w.copy_(torch.randn(w.shape, generator=g) * 0.3)
    return experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_equals_the_loop_over_experts(dtype):
    """torch._grouped_mm runs on CPU in this torch (fp32 and bf16 eagerly): both kernels on the same
    buffer, empty experts included, outputs and all gradients."""
    experts = _experts().to(dtype)
    ids = torch.tensor([3, 0, 3, 3, 1, 0, 3, 4, 4, 3, 0, 3, 1])  # expert 2 gets nothing
    groups = group_by_expert(ids, 5)
    x = torch.randn(groups.rows, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    outs = []
    for kernel in (grouped_mlps, looped_mlps):
        xi = x.clone().requires_grad_()
        experts.zero_grad()
        y = kernel(xi, groups.offsets, experts.w1, experts.w3, experts.w2, gated, False)[groups.dest]
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append([y, xi.grad[groups.dest], experts.w1.grad, experts.w3.grad, experts.w2.grad])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **tol)


def _reference(x, chosen, weights, experts, cap):
    """Token by token: each expert takes its first `cap` assignments in token order."""
    out, taken, dropped = torch.zeros_like(x), [0] * experts.n_experts, 0
    for t in range(x.shape[0]):
        for k in range(chosen.shape[1]):
            e = int(chosen[t, k])
            if cap is not None and taken[e] >= cap:
                dropped += 1
                continue
            taken[e] += 1
            h = gated(x[t] @ experts.w1[e].T, x[t] @ experts.w3[e].T, False) @ experts.w2[e].T
            out[t] += weights[t, k] * h
    return out, dropped


@pytest.mark.parametrize("factor", [0.0, 1.0, 0.5])
def test_tokens_sorted_to_experts_and_back_with_capacity(factor):
    experts = _experts()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(23, 16, generator=g)
    logits = torch.randn(23, 5, generator=g) + torch.tensor([2.0, 0, 0, 0, 1.0])  # experts 0 and 4 crowded
    weights, chosen, _ = route(logits, 2, True)
    out, dropped = LocalDispatch(factor)(x, chosen, weights, experts)
    cap = None if factor == 0 else math.ceil(factor * 23 * 2 / 5)
    ref, ref_dropped = _reference(x, chosen, weights, experts, cap)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert int(dropped) == ref_dropped and (ref_dropped > 0) == (factor > 0)  # crowded experts drop even at 1.0


def test_moe_layer_is_the_same_under_activation_checkpointing_and_compile():
    """The router statistics are block outputs: recomputed with the block (activation checkpointing)
    and traced with it (torch.compile), the losses and every gradient stay those of the plain block. In
    bf16 the grouped path has static shapes: the whole block is one graph."""
    from torch.distributed._composable import checkpoint

    cfg = preset("tiny-qwen3-moe")
    torch.manual_seed(0)
    ref = Decoder(cfg)
    ref.init_weights()
    t = batch(vocab=512, s=24)

    def loss_and_grads(model):
        aux = {}
        logits = model(t, aux=aux)
        balance, z = router_losses(aux["router"])
        (logits.float().logsumexp(-1).mean() + 0.1 * balance + 0.01 * z).backward()
        return [balance.detach(), z.detach()] + [p.grad.float().clone() for p in model.parameters()]

    def wrapped(wrap, dtype):
        model = Decoder(cfg).to(dtype)
        model.load_state_dict(ref.state_dict())
        for block in model.layers:
            wrap(block)
        return model

    compiled = lambda fullgraph: lambda block: block.compile(backend="aot_eager", fullgraph=fullgraph)  # noqa: E731
    for wrap, dtype in ((checkpoint, torch.float32), (compiled(False), torch.float32), (compiled(True), torch.bfloat16)):
        want = loss_and_grads(wrapped(lambda block: None, dtype))
        for a, b in zip(loss_and_grads(wrapped(wrap, dtype)), want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_init_and_parameter_counts_of_moe_layers():
    cfg = preset("tiny-qwen3-moe")
    with torch.device("meta"):
        meta = Decoder(cfg)
    assert param_counts(cfg)[0] == sum(p.numel() for p in meta.parameters())
    assert [type(b.feed_forward).__name__ for b in meta.layers] == ["MoE", "FeedForward", "MoE"]
    model = Decoder(cfg)
    torch.manual_seed(0)
    model.init_weights()
    moe = model.layers[0].feed_forward
    assert moe.experts.w1.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert moe.experts.w2.std().item() == pytest.approx(cfg.init_std / math.sqrt(2 * cfg.n_layers), rel=0.05)
    assert moe.router.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)
    # Model FLOPs count the active parameters: a top-2-of-8 layer costs what a dense one of two experts does.
    two = dataclasses.replace(cfg, n_experts=2, moe_top_k=2)
    assert flops_per_token(cfg, 64) - flops_per_token(two, 64) == 6 * 2 * (cfg.n_experts - 2) * cfg.dim  # routers only


# Model cards: total and activated parameters.
PUBLISHED = {"qwen3-30b-a3b": (30.5e9, 3.3e9), "olmoe-1b-7b": (6.9e9, 1.3e9), "mixtral-8x7b": (46.7e9, 12.9e9)}


def test_presets_match_published_parameter_counts_and_round_trip():
    for name, (total, active) in PUBLISHED.items():
        cfg = preset(name)
        assert param_counts(cfg)[0] == pytest.approx(total, rel=0.02), name
        assert param_counts(cfg, active=True)[0] == pytest.approx(active, rel=0.03), name
        hf = to_hf_config(cfg)
        assert from_hf_config(hf, source=name) == cfg
        config = transformers.AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
        assert config.num_experts_per_tok == cfg.moe_top_k
    assert preset("qwen3-30b-a3b").moe_norm_topk and not preset("olmoe-1b-7b").moe_norm_topk
    for name in ("tiny-qwen3-moe", "tiny-mixtral"):
        assert from_hf_config(to_hf_config(preset(name))) == preset(name)


def _edit(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_what_is_not_implemented_is_refused_in_one_line(tmp_path):
    cases = {"olmoe": ({"clip_qkv": 8.0}, "clip_qkv=8.0 is not supported for olmoe"),
             "mixtral": ({"router_jitter_noise": 0.1}, "router_jitter_noise=0.1 is not supported for mixtral"),
             "qwen3_moe": ({"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window=True is not supported")}
    for kind, (change, message) in cases.items():
        folder = tmp_path / kind
        tiny_hf_model(kind).save_pretrained(folder)
        _edit(folder, **change)
        with pytest.raises(UserError, match=message) as err:
            load_hf_dir(folder)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="a llama model has no mixture of experts; families with one: qwen3_moe"):
        dataclasses.replace(preset("tiny"), n_experts=4, moe_top_k=2, moe_ffn_dim=32).validate()
    with pytest.raises(UserError, match="moe_top_k=9 must be between 1 and n_experts=8"):
        dataclasses.replace(preset("tiny-mixtral"), moe_top_k=9).validate()
    with pytest.raises(UserError, match="moe_norm_topk=False is not a mixtral model's"):
        dataclasses.replace(preset("tiny-mixtral"), moe_norm_topk=False).validate()

