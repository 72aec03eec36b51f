"""The single-process loop: it learns, it resumes bit for bit, it refuses bad input early."""
import json
import subprocess
import sys

import pytest
import torch

from cptrain.errors import UserError
from tests.conftest import tiny_overrides
from cptrain.trainer.checkpoint import find_resume, verify
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import run


def _cfg(tmp_path, data, **extra):
    return load_config(None, tiny_overrides(tmp_path / "run", data, **extra))


def _losses(rows):
    return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("val/austen")) for r in rows]


def test_loss_goes_down(tmp_path, austen_data):
    rows = run(_cfg(tmp_path, austen_data, **{"train.max_tokens": 40960}))
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    val = [r["val/austen"] for r in rows if "val/austen" in r]
    assert val[-1] < val[0] - 0.8
    run_dir = tmp_path / "run"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"} <= logged[-1].keys()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "run_info.json").is_file()


@pytest.mark.resume
def test_resume_is_bit_exact(tmp_path, austen_data):
    cfg = _cfg(tmp_path, austen_data, **{"checkpoint.interval_tokens": 10240, "eval.interval_tokens": 5120})
    full = run(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    # Pretend the run died after its step-10 checkpoint: remove what came after, then resume.
    import shutil
    shutil.rmtree(ckpts / "step-00000020")
    (ckpts / "latest").write_text("step-00000010\n")
    resumed = run(cfg, resume=True)
    assert _losses(resumed) == [x for x in _losses(full) if x[0] > 10]
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(logged) and len(logged) == len(set(logged)), "metrics rows after the checkpoint are not duplicated"


@pytest.mark.resume
def test_resume_refuses_other_shape(tmp_path, austen_data):
    run(_cfg(tmp_path, austen_data, **{"train.max_tokens": 2048}))
    with pytest.raises(UserError, match="checkpoint model differs from the config in dim"):
        run(_cfg(tmp_path, austen_data, **{"train.max_tokens": 4096, "model.dim": 96}), resume=True)


@pytest.mark.faults
def test_bad_data_is_refused_before_work(tmp_path, austen_data):
    with pytest.raises(UserError, match="vocab"):
        run(_cfg(tmp_path, austen_data, **{"model.vocab_size": 256}))
    with pytest.raises(UserError, match="manifest.json"):
        run(_cfg(tmp_path, tmp_path / "nowhere"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.faults
def test_cli_errors_are_one_line(tmp_path, austen_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_tokns: 5\n")
    r = subprocess.run([sys.executable, "-m", "cptrain.launch.cli", "train", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"cptrain: error: {cfg}: unknown key 'train.max_tokns'; did you mean 'train.max_tokens'?"]


@pytest.mark.faults
def test_checkpoints_are_complete_and_pruned(tmp_path, austen_data):
    run(_cfg(tmp_path, austen_data, **{"checkpoint.interval_tokens": 4096, "checkpoint.keep_last": 2}))
    root = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == ["step-00000016", "step-00000020"]
    assert (root / "latest").read_text().strip() == "step-00000020"
    assert all(verify(root / n) is None for n in names)
    # A flipped byte in the newest checkpoint makes resume fall back to the older one.
    weights = root / "step-00000020" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    skipped = []
    assert find_resume(tmp_path / "run", log=skipped.append) == root / "step-00000016"
    assert "checksum mismatch" in skipped[0]


@pytest.mark.hf
def test_export_to_hf_loads_in_transformers(tmp_path, austen_data):
    from transformers import AutoModelForCausalLM

    from cptrain.launch.cli import main
    from cptrain.model.hf import load_weights
    from cptrain.model.decoder import Decoder

    run(_cfg(tmp_path, austen_data, **{"train.max_tokens": 2048}))
    assert main(["convert", "cptrain-to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    cfg, state = load_weights(tmp_path / "run" / "checkpoints" / "step-00000002")
    ours = Decoder(cfg)
    ours.load_state_dict(state)
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.distributed
def test_fsdp2_on_one_rank_trains_as_the_local_engine(tmp_path, austen_data):
    """One rank has nothing to shard: fsdp2 runs the model unsharded, the local engine's maths bit for
    bit, and still writes DCP checkpoints (tests/test_distributed.py resumes them 2 -> 1 -> 2 ranks)."""
    rows = {}
    (tmp_path / "c.yaml").write_text("{}\n")
    for engine in ("local", "fsdp2"):  # in processes of their own: fsdp2 creates a process group
        args = tiny_overrides(tmp_path / engine, austen_data, **{"train.engine": engine, "train.max_tokens": 4096})
        out = subprocess.run([sys.executable, "-m", "cptrain.launch.cli", "train", str(tmp_path / "c.yaml"), *args],
                             check=True, capture_output=True, text=True).stdout
        assert ("nothing to shard" in out) == (engine == "fsdp2")
        lines = (tmp_path / engine / "metrics.jsonl").read_text().splitlines()
        rows[engine] = [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, lines) if "loss" in r]
    assert len(rows["local"]) == 4 and rows["fsdp2"] == rows["local"]
    assert (tmp_path / "fsdp2" / "checkpoints" / "step-00000004" / "dcp" / ".metadata").is_file()
