"""Long context: every kind of RoPE (a new base, linear, llama3, YaRN) against transformers, in each
family: the frequencies and the attention scale bitwise, configs that import and export unchanged in
both the older `rope_scaling` and the newer `rope_parameters` spelling, logits of tiny models with
randomized weights, and `cptrain eval` of a YaRN Qwen3 at 4x its original window; one-line refusals
of what is not implemented. Then `model.extend`: each method resolved, undefined combinations
refused, and a YaRN-extended run whose export transformers scores as cptrain does past the old window."""
import dataclasses
import importlib
import json

import pytest
import torch
import transformers

from cptrain.data_pipeline.loader import split_batches
from cptrain.errors import UserError
from cptrain.launch.cli import main as cli
from cptrain.model.decoder import Decoder
from cptrain.model.hf import load_hf_dir
from cptrain.model.hf_config import from_hf_config, to_hf_config
from cptrain.model.presets import preset
from cptrain.model.rope import rope_init
from cptrain.trainer.config import load_config
from cptrain.trainer.evaluate import load_model
from cptrain.trainer.loop import run
from tests.conftest import FIXTURES, tiny_overrides
from tests.test_evaluate import reference_loss

pytestmark = pytest.mark.longctx

SHAPE = dict(vocab_size=320, hidden_size=128, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
             num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-6)
# family -> (transformers config class, its module, extra config keys); head_dim 64 everywhere.
FAMILIES = {
    "llama": (transformers.LlamaConfig, "llama", {}),
    "mistral": (transformers.MistralConfig, "mistral", {}),
    "qwen2": (transformers.Qwen2Config, "qwen2", {}),
    "qwen3": (transformers.Qwen3Config, "qwen3", {"head_dim": 64}),
    "gemma2": (transformers.Gemma2Config, "gemma2", {"head_dim": 64, "query_pre_attn_scalar": 64}),
    "gemma3": (transformers.Gemma3TextConfig, "gemma3", {"head_dim": 64, "query_pre_attn_scalar": 64,
                                                         "sliding_window": 8, "sliding_window_pattern": 2}),
    "olmo2": (transformers.Olmo2Config, "olmo2", {}),
}
# Non-trivial settings of each kind; the YaRN cases cover the ramp bounds, no truncation, DeepSeek's
# mscale pair and an explicit attention factor.
KINDS = {
    "abf": {"rope_type": "default", "rope_theta": 500_000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 20_000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500_000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10_000.0},
    "yarn_betas": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 512, "beta_fast": 16,
                   "beta_slow": 2, "truncate": False, "rope_theta": 1_000_000.0},
    "yarn_mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
                    "mscale_all_dim": 0.707, "rope_theta": 10_000.0},
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
                              "attention_factor": 1.25, "rope_theta": 1_000_000.0},
}


def config_json(family: str, kind: dict, legacy: bool = False) -> dict:
    """A config.json of `family` with `kind` on its (full-attention) layers, as transformers 5 writes
    it (`rope_parameters`, per layer type for Gemma 3) or in the older spelling (top-level
    `rope_theta` + `rope_scaling`, and Gemma 3's `rope_local_base_freq`)."""
    config_cls, _, extra = FAMILIES[family]
    if family == "gemma3":
        kind = {k: v for k, v in kind.items() if k != "truncate"}  # transformers reads no truncate per layer type
        rope = {"full_attention": kind, "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    d = config_cls(**SHAPE, **extra, rope_parameters=rope if family == "gemma3" else kind).to_dict()
    if legacy:
        del d["rope_parameters"]
        scaling = {k: v for k, v in kind.items() if k != "rope_theta"}
        d.update(rope_theta=kind["rope_theta"], rope_scaling=None if scaling["rope_type"] == "default" else scaling)
        if family == "gemma3":
            d["rope_local_base_freq"] = 10_000.0
    return d


def hf_config(family: str, kind: dict, legacy: bool = False):
    return FAMILIES[family][0].from_dict(config_json(family, kind, legacy))


def transformers_rope(family: str, config) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention scale) of the rotary embedding transformers' model of `family` builds
    (through ROPE_INIT_FUNCTIONS for every scaled kind)."""
    _, module, _ = FAMILIES[family]
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    rotary = getattr(mod, f"{type(config).__name__.removesuffix('Config').removesuffix('Text')}RotaryEmbedding")(config)
    if family == "gemma3":
        return rotary.full_attention_inv_freq, rotary.full_attention_attention_scaling
    return rotary.inv_freq, rotary.attention_scaling


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_rope_kind_equals_transformers_bitwise(family):
    for name, kind in KINDS.items():
        for legacy in (False, True):
            d = config_json(family, kind, legacy)
            want_freq, want_scale = transformers_rope(family, FAMILIES[family][0].from_dict(d))
            cfg = from_hf_config(d, source=f"{family} {name}")
            got_freq, got_scale = rope_init(cfg.rope_theta, cfg.head_size, cfg.rope_scaling)
            assert torch.equal(got_freq, want_freq), (family, name, legacy)
            assert got_scale == want_scale, (family, name, legacy, got_scale, want_scale)
            if name.startswith("yarn"):
                assert got_scale > 1 and not torch.equal(got_freq, rope_init(cfg.rope_theta, cfg.head_size, None)[0])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_rope_settings_round_trip_through_config_json(family):
    """config.json -> ModelConfig -> config.json: transformers reads the same RoPE from the export, in
    either spelling of the original, and reading the export back gives the same ModelConfig."""
    for name, kind in KINDS.items():
        for legacy in (False, True):
            original = config_json(family, kind, legacy)
            cfg = from_hf_config(original, source=name)
            exported = json.loads(json.dumps(to_hf_config(cfg)))
            assert from_hf_config(exported, source=name) == cfg
            config_cls = FAMILIES[family][0]
            assert config_cls.from_dict(exported).rope_parameters == config_cls.from_dict(original).rope_parameters, (name, legacy)
            assert exported["max_position_embeddings"] == original["max_position_embeddings"]


def tiny_model(config):
    """transformers' model of `config` with every weight moved off its initial value (norms too), on its
    SDPA path (the one our decoder's sdpa backend matches op for op)."""
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    unit_offset = config.model_type.startswith("gemma")  # (1 + w) norms: w near 0 is their identity
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(((0.0 if unit_offset else 1.0) + 0.1 * torch.randn_like(p)) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("family, kind", [("llama", "yarn"), ("qwen2", "linear"), ("gemma3", "yarn"),
                                          ("qwen3", "yarn_mscale")])
@torch.no_grad()
def test_logits_of_scaled_rope_models_equal_transformers(family, kind, tmp_path):
    config = hf_config(family, KINDS[kind])
    hf = tiny_model(config)
    hf.save_pretrained(tmp_path)
    cfg, sd = load_hf_dir(tmp_path)
    assert cfg.rope_scaling["rope_type"] == KINDS[kind]["rope_type"]
    model = Decoder(cfg).eval()
    model.load_state_dict(sd)
    tokens = torch.randint(0, 320, (2, 200), generator=torch.Generator().manual_seed(1))  # ~3x the original 64
    ref = hf(tokens).logits
    assert ref.abs().max() > 1
    torch.testing.assert_close(model(tokens), ref, atol=1e-5, rtol=0)  # measured 0.0: bitwise equal


def test_what_rope_cannot_be_is_refused_in_one_line():
    tiny = preset("tiny")
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    cases = {
        "rope_scaling lacks \\['original_max_position_embeddings'\\]; yarn scaling needs": {"rope_type": "yarn", "factor": 4.0},
        "rope_scaling keys \\['short_factor'\\] are not part of yarn scaling": {**yarn, "short_factor": [1.0]},
        "beta_fast must exceed beta_slow": {**yarn, "beta_fast": 1, "beta_slow": 2},
        "factor must be a positive number": {**yarn, "factor": -2.0},
        "truncate must be true or false": {**yarn, "truncate": "no"},
        "original_max_position_embeddings must be a positive integer": {**yarn, "original_max_position_embeddings": 6.4},
        "mscale must be a number or null": {**yarn, "mscale": "1"},
    }
    for message, scaling in cases.items():
        with pytest.raises(UserError, match=message) as err:
            dataclasses.replace(tiny, rope_scaling=scaling).validate()
        assert "\n" not in str(err.value)
    gemma = dataclasses.replace(preset("gemma3-270m"), rope_scaling={**yarn, "truncate": False})
    with pytest.raises(UserError, match="truncate=False is not supported for gemma3"):
        gemma.validate()
    hf = hf_config("llama", KINDS["yarn"]).to_dict()
    for message, params in {"RoPE type 'longrope' is not supported": {"rope_type": "longrope", "rope_theta": 1e4},
                            "partial_rotary_factor=0.5 is not supported": {**KINDS["yarn"], "partial_rotary_factor": 0.5}}.items():
        with pytest.raises(UserError, match=message):
            from_hf_config({**hf, "rope_parameters": params}, source="config.json")


# ---- `cptrain eval` of a YaRN Qwen3 (factor 4 over an original window of 64) on 256-token samples ----
@pytest.fixture(scope="module")
def long_data(austen_data, tmp_path_factory):
    """The Austen chapters (~700 tokens each) packed into 256-token samples with the Austen tokenizer."""
    out = tmp_path_factory.mktemp("long") / "austen256"
    assert cli(["data", "prepare", "--input", str(FIXTURES / "text" / "austen_pp.jsonl"), "--out", str(out),
                "--tokenizer", str(austen_data / "tokenizer.model"), "--seq-len", "256", "--val-fraction", "0.25"]) == 0
    return out


def test_eval_of_a_yarn_qwen3_at_four_times_its_window_equals_transformers(long_data, tmp_path):
    config = transformers.Qwen3Config(**{**SHAPE, "vocab_size": 512}, head_dim=64, rope_parameters=KINDS["yarn"])
    hf = tiny_model(config)
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "eval.json"
    assert cli(["eval", str(tmp_path / "hf"), "--data", str(long_data), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    want, tokens = reference_loss(tmp_path / "hf", long_data, "val", None)
    assert got["tokens"] == tokens and got["samples"] >= 4
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    # The window was really exceeded: the same weights with plain RoPE score differently.
    plain = json.loads((tmp_path / "hf/config.json").read_text())
    plain["rope_parameters"] = {"rope_type": "default", "rope_theta": 10_000.0}
    (tmp_path / "hf/config.json").write_text(json.dumps(plain))
    assert cli(["eval", str(tmp_path / "hf"), "--data", str(long_data), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["loss"] != pytest.approx(want, rel=1e-3)


# ---- model.extend: a longer window for the model of model.init_from ----
def _config_only(folder, **hf) -> str:
    """An HF folder holding only config.json: all that resolving a config reads."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_json("llama", KINDS["abf"]) | hf))
    return str(folder)


def test_extend_resolves_each_method_and_refuses_undefined_combinations(tmp_path):
    def arch(init_from, **extend):
        overrides = [f"--model.init_from={init_from}", "--data.seq_len=64"]
        return load_config(None, overrides + [f"--model.extend.{k}={v}" for k, v in extend.items()]).model.arch

    plain = _config_only(tmp_path / "plain", max_position_embeddings=64)
    a = arch(plain, method="yarn", factor=4)
    assert a.max_seq_len == 256 and a.rope_theta == 500_000.0
    assert a.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                              "beta_fast": 32.0, "beta_slow": 1.0}
    a = arch(plain, method="llama3", max_seq_len=512)
    assert a.rope_scaling["factor"] == 8.0 and a.rope_scaling["original_max_position_embeddings"] == 64
    a = arch(plain, method="theta", rope_theta=5e6, max_seq_len=128)
    assert (a.rope_theta, a.rope_scaling, a.max_seq_len) == (5e6, None, 128)
    linear = _config_only(tmp_path / "linear", max_position_embeddings=128,
                          rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    assert arch(linear, method="linear", factor=3).rope_scaling == {"rope_type": "linear", "factor": 6.0}
    yarn = _config_only(tmp_path / "yarn", max_position_embeddings=256, rope_parameters=KINDS["yarn"])
    a = arch(yarn, method="theta", rope_theta=1e6, max_seq_len=512)  # a new base on top of YaRN
    assert a.rope_theta == 1e6 and a.rope_scaling == {k: v for k, v in KINDS["yarn"].items() if k != "rope_theta"}
    refusals = {"already scaled \\(yarn, factor 4.0\\), and yarn on top of it is not defined": (yarn, dict(method="yarn", factor=2)),
                "max_seq_len=32 does not exceed the model's max_seq_len 64": (plain, dict(method="yarn", max_seq_len=32)),
                "method=theta takes rope_theta": (plain, dict(method="theta", rope_theta=1e6)),
                "needs factor \\(e.g. 4\\) or max_seq_len": (plain, dict(method="linear")),
                "has settings but model.extend.method is off": (plain, dict(factor=4))}
    for message, (init_from, extend) in refusals.items():
        with pytest.raises(UserError, match=message) as err:
            arch(init_from, **extend)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="model.max_seq_len conflicts with model.extend, which sets it to 256"):
        load_config(None, [f"--model.init_from={plain}", "--model.extend.method=yarn", "--model.extend.factor=4",
                           "--model.max_seq_len=512"])


def test_a_yarn_extended_run_exports_what_transformers_computes_past_the_old_window(long_data, austen_data, tmp_path):
    """A tiny Llama with a 64-token window, extended by YaRN x4 and trained 2 steps on 256-token
    samples: its checkpoints and its HF export carry the new RoPE and window, and transformers gives
    the export the logits and the loss cptrain gives the run."""
    config = transformers.LlamaConfig(**{**SHAPE, "vocab_size": 512, "max_position_embeddings": 64})
    tiny_model(config).save_pretrained(tmp_path / "base")
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_overrides(run_dir, long_data, **{
        "model.init_from": str(tmp_path / "base"), "model.extend.method": "yarn", "model.extend.factor": 4,
        "data.seq_len": 256, "train.max_tokens": 1024, "train.global_batch_tokens": 512, "train.micro_batch_size": 2,
        "train.device": "cpu", "train.precision": "fp32", "schedule.kind": "constant", "schedule.lr": 1e-3,
        "schedule.warmup_tokens": 0, "checkpoint.interval_tokens": 512, "eval.max_samples": 4,
        "continual.report": "off"}) if not o.startswith(("--model.preset", "--model.vocab_size", "--model.max_seq_len"))]
    rows = run(load_config(None, overrides))
    assert len([r for r in rows if "loss" in r]) == 2
    saved = json.loads((run_dir / "checkpoints/step-00000002/model_config.json").read_text())
    want = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}
    assert saved["rope_scaling"] == want and saved["max_seq_len"] == 256
    assert cli(["convert", "cptrain-to-hf", str(run_dir), str(tmp_path / "hf")]) == 0
    exported = json.loads((tmp_path / "hf/config.json").read_text())
    assert exported["max_position_embeddings"] == 256 and exported["rope_parameters"] == {**want, "rope_theta": 10_000.0}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    ours = load_model(run_dir, torch.device("cpu"))
    _, batches = split_batches(long_data, "val", 2, 2)
    tokens = next(batches)["tokens"][:, :-1]  # [2, 256]: four times the old window
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-5, rtol=0)
    for model in (run_dir, tmp_path / "hf"):
        assert cli(["eval", str(model), "--data", str(long_data), "--json", str(tmp_path / "eval.json")]) == 0
        got = json.loads((tmp_path / "eval.json").read_text())["loss"]
        assert got == pytest.approx(reference_loss(tmp_path / "hf", long_data, "val", None)[0], rel=1e-5)
    # An anneal branch of the run keeps its extended model.
    assert cli(["anneal", str(run_dir), "--tokens", "512", "--checkpoint", "step-00000001", "--out",
                str(tmp_path / "branch"), "--no-train"]) == 0
    assert load_config(tmp_path / "branch/config.yaml").model.arch == load_config(run_dir / "config.yaml").model.arch
