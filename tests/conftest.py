import os
from pathlib import Path

import pytest

# Tests never reach a hub: everything they load is local or shipped in a package.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def austen_data(tmp_path_factory) -> Path:
    """Real text (Pride and Prejudice chapters) prepared once: sentencepiece vocab 512, seq_len 64."""
    from cptrain.launch.cli import main

    out = tmp_path_factory.mktemp("data") / "austen"
    rc = main(["data", "prepare", "--input", str(FIXTURES / "text" / "austen_pp.jsonl"), "--out", str(out),
               "--train-tokenizer", "512", "--seq-len", "64", "--val-fraction", "0.1"])
    assert rc == 0
    return out


def tiny_overrides(run_dir: Path, data: Path, **extra) -> list[str]:
    """Overrides for a seconds-long CPU run of the tiny model on `data` (seq_len 64, 1024 tokens a step)."""
    base = {
        "run_dir": str(run_dir),
        "model.preset": "tiny", "model.vocab_size": 512, "model.max_seq_len": 64,
        "data.seq_len": 64, "data.domains": f"[{{name: austen, path: {data}}}]",
        "train.max_tokens": 20480, "train.global_batch_tokens": 1024, "train.micro_batch_size": 8,
        "schedule.lr": 3e-3, "eval.max_samples": 16, "log.progress": False,
    }
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]
