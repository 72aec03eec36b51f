"""The config schema: typos and wrong types fail at load with the key path; overrides apply."""
import pytest

from cptrain.errors import UserError
from cptrain.trainer.config import load_config, save_config

pytestmark = pytest.mark.faults


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["--train.max_tokens=2M", "--model.dim=96", "--optim.beta2=0.99", "--run_dir=x", "--data.seq_len=128"])
    assert cfg.train.max_tokens == 2_000_000
    assert cfg.model.arch.dim == 96 and cfg.model.preset == "tiny"
    assert cfg.optim.beta2 == 0.99 and cfg.run_dir == "x"


@pytest.mark.parametrize("text,needle", [
    ("train:\n  max_tokns: 10\n", "unknown key 'train.max_tokns'; did you mean 'train.max_tokens'"),
    ("train:\n  max_tokens: lots\n", "train.max_tokens must be an integer"),
    ("train:\n  engine: horovod\n", "train.engine must be one of"),
    ("optim:\n  beta1: [1]\n", "optim.beta1 must be a number"),
    ("model:\n  preset: 13B\n", "13B"),
    ("model:\n  dim: 100\n  n_heads: 3\n", "dim"),
    ("modle:\n  dim: 1\n", "did you mean 'model'"),
    ("train: [1, 2\n", "not valid YAML"),
    ("train:\n  global_batch_tokens: 1000\ndata:\n  seq_len: 128\n", "not a multiple"),
    ("model:\n  preset: tiny\ndata:\n  seq_len: 64\ntrain:\n  engine: deepspeed\n  compile: true\n  device: cpu\n  global_batch_tokens: 1024\n  micro_batch_size: 8\ndeepspeed:\n  deepcompile: true\n", "needs a CUDA device"),
])
def test_bad_configs_name_the_key(tmp_path, text, needle):
    with pytest.raises(UserError) as e:
        load_config(_write(tmp_path, text))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="--section.key=value"):
        load_config(None, ["train.max_tokens=5"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--model.n_layers=3", "--train.max_tokens=1.5M", "--data.seq_len=128"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
