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
from tests.conftest import ours, random_hf_model, saved_hf, token_batch

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
    return random_hf_model(config_cls(**SHAPE, **extra))  # router, expert and norm weights all moved


@pytest.fixture(params=list(TINY))
def hf_folder(request, tmp_path):
    return saved_hf(tiny_hf_model(request.param), request.param, tmp_path)


@torch.no_grad()
def test_logits_and_balancing_loss_match_transformers(hf_folder):
    kind, path, hf = hf_folder
    t = token_batch()
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
    t = token_batch()
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


def test_a_moe_layer_on_grouped_gemm_compiles_to_one_graph():
    """Routing, sorting to experts, the grouped GEMMs and the router statistics trace as one graph: no
    data-dependent shape (bincount's length was one, twice a layer) splits the compiled block."""
    cfg = preset("tiny-mixtral")
    moe = MoE(cfg).to(torch.bfloat16)
    moe.experts.kernel = grouped_mlps
    explained = torch._dynamo.explain(moe)(torch.randn(2, 16, cfg.dim, dtype=torch.bfloat16))
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1


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
    out, _, dropped = LocalDispatch(factor)(x, chosen, weights, experts)
    cap = None if factor == 0 else math.ceil(factor * 23 * 2 / 5)
    ref, ref_dropped = _reference(x, chosen, weights, experts, cap)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert int(dropped) == ref_dropped and (ref_dropped > 0) == (factor > 0)  # crowded experts drop even at 1.0


def test_sigmoid_router_follows_deepseek_v3():
    """moe_router=sigmoid (DeepSeek-V3 eq. 15-16, 18): selection by sigmoid score plus the bias, weights the
    chosen unbiased scores renormalized, the balancing statistics from the scores normalized over experts."""
    g = torch.Generator().manual_seed(4)
    logits, bias = torch.randn(9, 6, generator=g), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0])  # expert 5 always picked
    weights, chosen, probs = route(logits, 2, True, bias, "sigmoid")
    s = torch.sigmoid(logits)
    want = torch.stack([torch.cat([torch.tensor([5]), (s[i, :5]).topk(1).indices]) for i in range(9)])
    assert torch.equal(chosen.sort(dim=1).values, want.sort(dim=1).values)
    picked = s.gather(1, chosen)
    torch.testing.assert_close(weights, picked / picked.sum(dim=1, keepdim=True))
    torch.testing.assert_close(probs, s / s.sum(dim=1, keepdim=True))
    cfg = dataclasses.replace(preset("tiny-mixtral"), moe_router="sigmoid").validate()
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.router.weight, 0.0, 0.5)
    for w in (moe.experts.w1, moe.experts.w3, moe.experts.w2):
        torch.nn.init.normal_(w, 0.0, 0.05)
    x = torch.randn(1, 7, cfg.dim, generator=g)
    out, _ = moe(x)
    w, c, _ = route(moe.router(x[0]), cfg.moe_top_k, True, None, "sigmoid")
    ref, _ = _reference(x[0], c, w, moe.experts, None)
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)


def test_moe_layer_is_the_same_under_activation_checkpointing_and_compile():
    """The router statistics are block outputs: recomputed with the block (activation checkpointing)
    and traced with it (torch.compile), the losses and every gradient stay those of the plain block. In
    bf16 the grouped path has static shapes: the whole block is one graph."""
    from cptrain.trainer.engines.base import checkpoint_in_forward as checkpoint

    cfg = preset("tiny-qwen3-moe")
    torch.manual_seed(0)
    ref = Decoder(cfg)
    ref.init_weights()
    t = token_batch(vocab=512, s=24)

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

    compiled = lambda block: block.compile(backend="aot_eager", fullgraph=True)  # noqa: E731
    for wrap, dtype in ((checkpoint, torch.float32), (compiled, torch.bfloat16)):
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
    from cptrain.trainer.config import load_config

    for extra, message in (({"model.preset": "tiny"}, "parallel.ep=2 splits a mixture of experts' experts, but the model"),
                           ({"train.engine": "deepspeed"}, "parallel.ep=2 needs train.engine=fsdp2"),
                           ({"model.n_experts": 6, "parallel.ep": 4}, "parallel.ep=4 does not divide the model's 6 experts"),
                           ({"parallel.ep": 1, "parallel.cp": 2}, "parallel.cp=2 with a mixture of experts is not supported yet"),
                           ({"parallel.ep": 1, "train.mlp_tile_tokens": 32}, "are for dense models"),
                           ({"parallel.ep": 1, "model.moe_router": "relu"}, "moe_router='relu' must be softmax or sigmoid")):
        with pytest.raises(UserError, match=message) as err:
            load_config(None, [f"--{k}={v}" for k, v in {"model.preset": "tiny-mixtral", "data.seq_len": 64, "parallel.ep": 2,
                                                          **extra}.items()])
        assert "\n" not in str(err.value)


# ---- training: the router losses in what is backpropagated, their logs, resume, phases ----
def test_backpropagated_loss_and_gradients_equal_transformers_training_loss(tmp_path):
    """lm_loss of one micro-batch, scaled by 1 / targets, is transformers' training loss (mean cross-entropy
    + router_aux_loss_coef * balancing loss) and has its gradients, the router's included."""
    from cptrain.trainer.loss import lm_loss

    hf = tiny_hf_model("qwen3_moe").train()
    hf.save_pretrained(tmp_path)
    model = ours(tmp_path).train()
    t = token_batch()
    ref = hf(t[:, :-1], labels=t[:, :-1], shift_labels=t[:, 1:].contiguous(), output_router_logits=True)
    ref.loss.backward()
    loss, stats = lm_loss(model, {"tokens": t}, 1 / t[:, 1:].numel(), router_coefs=(hf.config.router_aux_loss_coef, 0.0))
    loss.backward()
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=0)
    assert stats["sums"]["router"].shape[0] == 2 and stats["sums"]["router_loss"][2] == t[:, 1:].numel()
    mlp, ff = hf.model.layers[2].mlp, model.layers[2].feed_forward
    f = ff.experts.w1.shape[1]
    torch.testing.assert_close(ff.router.weight.grad, mlp.gate.weight.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ff.experts.w1.grad, mlp.experts.gate_up_proj.grad[:, :f], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ff.experts.w2.grad, mlp.experts.down_proj.grad, rtol=1e-4, atol=1e-7)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.resume
def test_a_moe_run_logs_its_routers_and_resumes_bit_exactly(tmp_path, austen_data, capsys):
    """z-loss, auxiliary-loss-free balancing (its bias saved with the checkpoint) and a capacity: the
    logged router statistics, the histogram of `cptrain report`, and a resume that repeats the run."""
    from cptrain.launch.cli import main as cli
    from cptrain.trainer.config import load_config
    from cptrain.trainer.loop import run
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides(tmp_path / "run", austen_data, **{
        "model.preset": "tiny-qwen3-moe", "train.max_tokens": 4096, "checkpoint.interval_tokens": 2048,
        "eval.interval_tokens": 2048, "moe.z_loss_coef": 1e-3, "moe.bias_update_rate": 1e-3, "moe.capacity_factor": 1.25,
        "continual.report": "off"})
    full = run(load_config(None, overrides))
    last = full[-1]
    assert last["loss"] < full[1]["loss"]
    coef = preset("tiny-qwen3-moe").moe_aux_loss_coef
    assert last["loss_total"] == pytest.approx(last["loss"] + coef * last["moe/aux_loss"] + 1e-3 * last["moe/z_loss"], rel=1e-9)
    assert last["moe/aux_loss"] >= 1.0 - 1e-6  # the balancing loss is at least 1 (even routing)
    assert 0 < last["moe/dropped"] < 0.5 and last["moe/load_max"] > 1
    assert last["moe/bias_max"] == pytest.approx(4e-3)  # four steps of 1e-3, each expert up or down
    assert {"moe/layer0/load_max", "moe/layer2/entropy", "moe/layer2/dropped"} <= last.keys()
    assert "moe/layer1/load_max" not in last  # layer 1 is dense
    loads = [json.loads(line) for line in (tmp_path / "run" / "expert_load.jsonl").read_text().splitlines()]
    assert loads[-1]["layers"] == [0, 2] and all(sum(layer) == pytest.approx(1, abs=1e-4) for layer in loads[-1]["share"])
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["params_active"] < info["params"]
    assert cli(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report" / "routers.png").is_file() and (tmp_path / "run" / "report" / "expert_load.png").is_file()
    capsys.readouterr()
    assert cli(["convert", "cptrain-to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "selection bias (up to 0.004" in capsys.readouterr().out  # the export says the bias stays behind
    root = tmp_path / "run" / "checkpoints"
    assert json.loads((root / "step-00000002" / "moe.json").read_text())["bias"]
    shutil.rmtree(root / "step-00000004")
    (root / "latest").write_text("step-00000002\n")
    resumed = run(load_config(None, overrides), resume=True)
    strip = lambda rs: [(r["step"], r["loss"], r["grad_norm"], r.get("moe/bias_max")) for r in rs if "loss" in r]  # noqa: E731
    assert strip(resumed) == strip(full)[2:]


def test_phases_train_only_the_routers_then_only_the_experts(tmp_path, austen_data):
    from cptrain.trainer.checkpoint import load_full_weights
    from cptrain.trainer.config import load_config
    from cptrain.trainer.loop import run
    from tests.conftest import tiny_overrides

    cfg = preset("tiny-qwen3-moe")
    torch.manual_seed(0)
    model = Decoder(cfg)
    model.init_weights()
    save_hf_dir(cfg, model.state_dict(), tmp_path / "hf")
    overrides = [o for o in tiny_overrides(tmp_path / "run", austen_data, **{
        "model.init_from": str(tmp_path / "hf"), "train.max_tokens": 4096, "checkpoint.interval_tokens": 2048,
        "freeze.phases": "[{until_tokens: 2048, train: routers}, {until_tokens: 4096, train: experts}]",
        "eval.at_start": False, "continual.report": "off"}) if not o.startswith(("--model.preset", "--model.vocab_size", "--model.max_seq_len"))]
    run(load_config(None, overrides))
    start = model.state_dict()
    mid = load_full_weights(tmp_path / "run" / "checkpoints" / "step-00000002")[1]
    end = load_full_weights(tmp_path / "run" / "checkpoints" / "step-00000004")[1]
    for name in start:
        router, expert = ".router." in name, ".experts." in name
        assert torch.equal(mid[name], start[name]) != router, name  # the first phase moved the routers only
        assert torch.equal(end[name], mid[name]) != expert, name  # the second the experts only



def test_the_rest_of_the_trainer_works_on_a_moe_model(tmp_path, austen_data, capsys):
    """Replay, instance reweighting, FP8 (emulated) on the dense linears, the weight EMA and task
    evaluation in one run; then `cptrain merge`, `cptrain eval` and the export transformers loads."""
    from cptrain.data_pipeline.tasks import word_order_items, write_task
    from cptrain.launch.cli import main as cli
    from cptrain.trainer.config import load_config
    from cptrain.trainer.evaluate import load_model
    from cptrain.trainer.loop import run
    from tests.conftest import FIXTURES, tiny_overrides

    task = write_task(word_order_items((FIXTURES / "text" / "rv1909_0.txt").read_text(), 8, seed=0), tmp_path / "order.jsonl")
    rows = run(load_config(None, tiny_overrides(tmp_path / "run", austen_data, **{
        "model.preset": "tiny-qwen3-moe", "train.max_tokens": 4096, "checkpoint.interval_tokens": 2048,
        "data.replay": f"[{{name: again, path: {austen_data}}}]", "data.replay_fraction": 0.25,
        "reweighting.instance.strategy": "linupper", "train.fp8": "tensorwise", "train.fp8_emulate": True,
        "train.fp8_min_features": 16, "train.fp8_keep_ends": False, "train.ema_decay": 0.5,
        "eval.tasks": f"[{{name: order, path: {task}}}]", "continual.report": "off"})))
    assert "the routed experts stay in bf16" in capsys.readouterr().out
    assert rows[-1]["loss"] < rows[1]["loss"] and "eval/order/acc" in rows[-1] and rows[-1]["reweight/max_weight"] > 1
    assert cli(["merge", str(tmp_path / "run"), "--last", "2", "--ema", "--out", str(tmp_path / "merged")]) == 0
    assert cli(["eval", str(tmp_path / "merged"), "--data", str(austen_data), "--max-samples", "8",
                "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["loss"] < rows[0]["val/austen"]
    assert cli(["convert", "cptrain-to-hf", str(tmp_path / "merged"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    t = token_batch(vocab=512)
    with torch.no_grad():
        torch.testing.assert_close(hf(t).logits, load_model(tmp_path / "merged", torch.device("cpu"))(t), rtol=1e-5, atol=1e-5)


# ---- two ranks: every engine, and expert parallelism, from one launch ----
ENGINES = {"ddp": {}, "zero2": {"train.engine": "deepspeed", "deepspeed.zero_stage": 2},
           "zero3": {"train.engine": "deepspeed", "deepspeed.zero_stage": 3},
           "fsdp2": {"train.engine": "fsdp2", "train.loss_chunk_tokens": 256}}
# Expert parallelism against FSDP2 with the experts data-parallel: 10 steps with a capacity, the z-loss,
# activation checkpointing and a weight EMA; a checkpoint at step 5.
EP_BASE = {"model.preset": "tiny-qwen3-moe", "train.engine": "fsdp2", "train.max_tokens": 10240,
           "train.global_batch_tokens": 1024, "train.device": "cpu", "train.precision": "fp32",
           "checkpoint.interval_tokens": 5120, "eval.at_start": False, "moe.z_loss_coef": 1e-3,
           "moe.capacity_factor": 1.5, "train.ema_decay": 0.9, "train.activation_checkpointing": True,
           "continual.report": "off"}


def _launch(tmp_path, jobs: list, name: str) -> None:
    from argparse import Namespace

    from cptrain.launch.launchers import torchrun_command
    from tests.multiproc import free_port, run_processes

    (tmp_path / name).write_text(json.dumps(jobs))
    args = Namespace(nodes=1, gpus_per_node=2, hostfile=None, master_addr=None, master_port=free_port(), no_ssh=False,
                     node_rank=None)
    run_processes([torchrun_command(args, ["tests/dist_worker.py", str(tmp_path / name)], tmp_path)], timeout=900)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, austen_data):
    """One 2-rank launch: the engines' runs (2 steps) and the ep=1 / ep=2 runs (10 steps)."""
    from tests.conftest import tiny_overrides

    root = tmp_path_factory.mktemp("moe2")
    base = {"model.preset": "tiny-qwen3-moe", "train.max_tokens": 4096, "train.global_batch_tokens": 2048,
            "train.device": "cpu", "train.precision": "fp32", "moe.z_loss_coef": 1e-3, "continual.report": "off"}
    jobs = [{"overrides": tiny_overrides(root / name, austen_data, **base, **extra)} for name, extra in ENGINES.items()]
    jobs += [{"overrides": tiny_overrides(root / f"ep{ep}", austen_data, **EP_BASE, **{"parallel.ep": ep})} for ep in (1, 2)]
    _launch(root, jobs, "jobs.json")
    return root


@pytest.mark.distributed
def test_every_engine_trains_a_moe_model_alike_on_two_ranks(two_ranks):
    """DDP, ZeRO-2, ZeRO-3 and FSDP2 (experts data-parallel) on 2 gloo ranks give the same losses."""
    losses = {name: [v for r in _rows(two_ranks / name) if "loss" in r for v in (r["loss"], r["moe/aux_loss"])] for name in ENGINES}
    assert len(losses["ddp"]) == 4
    for name in ("zero2", "zero3", "fsdp2"):
        assert losses[name] == pytest.approx(losses["ddp"], rel=1e-5), (name, losses)


# ---- upcycling ----
def test_drop_upcycling_redraws_a_fraction_of_each_experts_units():
    from cptrain.model.upcycle import upcycle

    cfg = preset("tiny")
    torch.manual_seed(0)
    dense = Decoder(cfg)
    dense.init_weights()
    state = dense.state_dict()
    moe_cfg, moe = upcycle(cfg, state, 4, 2, drop_fraction=0.5, seed=3)
    assert moe_cfg.family == "mixtral" and moe_cfg.moe_norm_topk and moe.keys() == Decoder(moe_cfg).state_dict().keys()
    w1, w2 = state["layers.1.feed_forward.w1.weight"], state["layers.1.feed_forward.w2.weight"]
    e1, e2 = moe["layers.1.feed_forward.experts.w1"], moe["layers.1.feed_forward.experts.w2"]
    kept = [(e1[e] == w1).all(dim=1) for e in range(4)]  # the intermediate units each expert kept
    assert all(int(k.sum()) == cfg.ffn_dim - round(0.5 * cfg.ffn_dim) for k in kept)
    assert all(torch.equal((e2[e] == w2).all(dim=0), kept[e]) for e in range(4))  # w2's columns are the same units
    assert not torch.equal(kept[0], kept[1])  # each expert its own sample
    fresh = e1[0][~kept[0]]
    assert fresh.mean().item() == pytest.approx(w1.mean().item(), abs=3e-3)
    assert fresh.std().item() == pytest.approx(w1.std().item(), rel=0.1)  # the original matrix's statistics
    same, _ = upcycle(cfg, state, 4, 2, drop_fraction=0.5, seed=3)
    assert same == moe_cfg
    with pytest.raises(UserError, match="cannot upcycle this qwen3 model into mixtral: qk_norm='head'"):
        upcycle(preset("qwen3-0.6b"), {}, 4, 2, family="mixtral")


def test_an_upcycled_smollm2_computes_the_dense_function_and_continues(smollm2_dir, tmp_path):
    """`cptrain upcycle` at r = 0: the MoE's logits are the dense model's (identical experts, top-k weights
    summing to one), its folder is a transformers Mixtral, and one short
    continued step lowers its validation loss."""
    from cptrain.launch.cli import main as cli
    from cptrain.trainer.config import load_config
    from cptrain.trainer.evaluate import load_model
    from cptrain.trainer.loop import run
    from tests.conftest import FIXTURES

    out = tmp_path / "moe"
    assert cli(["upcycle", str(smollm2_dir), "--experts", "4", "--top-k", "2", "--out", str(out)]) == 0
    report = json.loads((out / "upcycle.json").read_text())
    assert report["family"] == "mixtral" and report["params_active"] < report["params"]
    dense, moe = load_model(smollm2_dir, torch.device("cpu")), load_model(out, torch.device("cpu"))
    t = torch.randint(0, dense.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(t), moe(t)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # fp32 rounding over 30 layers; logits reach ~30
    del dense, moe
    # a Mixtral to transformers (its tensor names are test_import_export_is_lossless's, on a tiny Mixtral)
    assert type(transformers.AutoConfig.from_pretrained(out)).__name__ == "MixtralConfig"
    data = tmp_path / "data"
    assert cli(["data", "prepare", "--input", str(FIXTURES / "text" / "austen_persuasion.jsonl"), "--out", str(data),
                "--tokenizer", str(out), "--seq-len", "32", "--val-fraction", "0.1"]) == 0
    rows = run(load_config(None, [f"--run_dir={tmp_path / 'run'}", f"--model.init_from={out}", "--data.seq_len=32",
                                  f"--data.domains=[{{name: austen, path: {data}}}]", "--train.max_tokens=64",
                                  "--train.global_batch_tokens=64", "--train.micro_batch_size=2", "--schedule.kind=constant",
                                  "--schedule.lr=2e-4", "--schedule.warmup_tokens=0", "--eval.max_samples=4",
                                  "--log.progress=false", "--checkpoint.at_end=false", "--continual.report=off"]))
    assert rows[-1]["val/austen"] < rows[0]["val/austen"] - 0.02, (rows[0], rows[-1])


# ---- expert parallelism ----
@pytest.mark.distributed
def test_expert_parallel_training_equals_data_parallel_and_resumes_at_another_ep(two_ranks, austen_data):
    """2 gloo ranks, FSDP2: experts split over ep=2 (tokens exchanged by all-to-all) give the losses, router
    losses and gradient norms of ep=1 over 10 steps; the ep=2 checkpoint of step 5 resumes in one process
    (ep=1) and repeats the rest."""
    import torch.distributed.checkpoint as dcp

    from cptrain.trainer.config import load_config
    from cptrain.trainer.loop import run
    from tests.conftest import tiny_overrides

    runs = {ep: two_ranks / f"ep{ep}" for ep in (1, 2)}

    def losses(run_dir, start=0):
        return [v for r in _rows(run_dir) if "loss" in r and r["step"] > start
                for v in (r["loss"], r["moe/aux_loss"], r["grad_norm"])]

    assert len(losses(runs[1])) == 30 and _rows(runs[2])[-1]["moe/dropped"] > 0
    assert losses(runs[2]) == pytest.approx(losses(runs[1]), rel=1e-5)
    root = runs[2] / "checkpoints"
    saved = dcp.FileSystemReader(str(root / "step-00000005" / "dcp")).read_metadata().state_dict_metadata
    chunks = saved["model.layers.0.feed_forward.experts.w1"].chunks  # each rank wrote its own 4 of the 8 experts
    assert sorted((c.offsets[0], c.sizes[0]) for c in chunks) == [(0, 4), (4, 4)]
    shutil.rmtree(root / "step-00000010")
    (root / "latest").write_text("step-00000005\n")
    run(load_config(None, tiny_overrides(runs[2], austen_data, **EP_BASE, **{"parallel.ep": 1})), resume=True)  # 1 process
    assert losses(runs[2], start=5) == pytest.approx(losses(runs[1], start=5), rel=1e-5)
