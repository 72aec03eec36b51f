"""`cptrain eval`: the loss of an HF folder on a prepared split equals transformers' own loss on the
same tokens (documents scored separately, which is what document masking computes); runs and
checkpoints score like the folder they export to; bad input is one line."""
import dataclasses
import json

import pytest
import torch
import transformers

from cptrain.data_pipeline.loader import split_batches
from cptrain.launch.cli import main as cli
from cptrain.model.hf import load_hf_dir, save_hf_dir

pytestmark = pytest.mark.eval


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """A random Qwen3 folder (decoupled head_dim, q/k norms) over the 512-piece Austen vocabulary."""
    out = tmp_path_factory.mktemp("qwen3")
    config = transformers.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def reference_loss(hf_dir, data, split: str, max_samples: int) -> tuple[float, int]:
    """transformers' next-token loss, each document of each sample run on its own (the last token of a
    document still predicts the next token of the row, from its own document only)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    total, count = 0.0, 0
    _, batches = split_batches(data, split, 4, max_samples)
    for batch in batches:
        for tokens, doc_ids in zip(batch["tokens"], batch["doc_ids"]):
            inputs, targets, docs = tokens[:-1], tokens[1:], doc_ids[:-1]
            for d in docs.unique():
                idx = (docs == d).nonzero().flatten()
                with torch.no_grad():
                    logits = model(inputs[idx][None]).logits[0].float()
                total += torch.nn.functional.cross_entropy(logits, targets[idx], reduction="sum").item()
                count += len(idx)
    return total / count, count


def test_eval_of_an_hf_folder_equals_transformers(qwen3_dir, austen_data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli(["eval", str(qwen3_dir), "--data", str(austen_data), "--max-samples", "12", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    want, tokens = reference_loss(qwen3_dir, austen_data, "val", 12)
    assert got["tokens"] == tokens == 12 * 64
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert f"loss {got['loss']:.4f}" in capsys.readouterr().out
    # The same model imported, and the training split.
    assert cli(["convert", "hf-to-cptrain", str(qwen3_dir), str(tmp_path / "w")]) == 0
    assert cli(["eval", str(tmp_path / "w"), "--data", str(austen_data), "--split", "train", "--max-samples", "8",
                "--json", str(out)]) == 0
    assert json.loads(out.read_text())["loss"] == pytest.approx(reference_loss(qwen3_dir, austen_data, "train", 8)[0], rel=1e-5)


def test_eval_refuses_bad_input_in_one_line(qwen3_dir, austen_data, tmp_path, capsys):
    cases = [(["eval", str(tmp_path / "nothing"), "--data", str(austen_data)], "no such checkpoint or run directory"),
             (["eval", str(qwen3_dir), "--data", str(austen_data), "--split", "test"], "no such split"),
             (["eval", str(qwen3_dir), "--data", str(tmp_path)], "manifest.json: missing")]
    for argv, message in cases:
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    cfg, sd = load_hf_dir(qwen3_dir)  # a model whose vocabulary the data's tokenizer exceeds
    save_hf_dir(dataclasses.replace(cfg, vocab_size=256), {k: v[:256] if v.shape[0] == 512 else v for k, v in sd.items()},
                tmp_path / "small")
    assert cli(["eval", str(tmp_path / "small"), "--data", str(austen_data)]) == 2
    assert "tokenizer vocabulary 512 exceeds the model's vocab_size 256" in capsys.readouterr().err
