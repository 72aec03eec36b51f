"""How a run starts (trainer/start.py), case by case: the plan is decided from the config, the run
directory and the flags alone, before anything is built."""
import shutil
from pathlib import Path

import pytest
import transformers

from cptrain.errors import UserError
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import run
from cptrain.trainer.start import StartPlan, plan_start
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.resume


@pytest.fixture(scope="module")
def parent(austen_data, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("start") / "parent"
    run(load_config(None, tiny_overrides(run_dir, austen_data, **{"train.max_tokens": 4096, "checkpoint.interval_tokens": 2048})))
    return run_dir


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    return out


def _plan(run_dir, data, resume=False, **extra) -> StartPlan:
    said = []
    plan = plan_start(load_config(None, tiny_overrides(run_dir, data, **extra)), resume, say=said.append)
    assert len(plan.describe().splitlines()) == 1
    return plan, said


def test_fresh(tmp_path, austen_data):
    plan, _ = _plan(tmp_path / "new", austen_data)
    assert plan == StartPlan("fresh")
    assert plan.describe() == "starting fresh: randomly initialized weights"


def test_resume_takes_the_newest_good_checkpoint(parent, austen_data):
    plan, _ = _plan(parent, austen_data, resume=True)
    assert plan.kind == "resume" and Path(plan.source) == parent / "checkpoints" / "step-00000004"
    assert plan.engine_state and plan.optimizer and plan.data_position and plan.counters and plan.masks
    assert not plan.initial_weights and (plan.step, plan.tokens) == (4, 4096)
    assert plan.describe().startswith(f"resumed from {plan.source} at step 4 (4,096 tokens)")


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path, austen_data):
    plan, said = _plan(tmp_path / "empty", austen_data, resume=True)
    assert plan == StartPlan("fresh")
    assert said == [f"no complete checkpoint in {tmp_path / 'empty'}; starting from the beginning"]


def test_init_from_hf_folder(tmp_path, austen_data, hf_dir):
    plan, _ = _plan(tmp_path / "run", austen_data, **{"model.init_from": str(hf_dir)})
    assert plan == StartPlan("init", str(hf_dir), initial_weights=True)
    with pytest.raises(UserError, match="holds weights only, so model.load=all cannot be restored"):
        _plan(tmp_path / "run", austen_data, **{"model.init_from": str(hf_dir), "model.load": "all"})


@pytest.mark.parametrize("load,reset,want", [
    ("weights", False, dict(initial_weights=True)),
    ("weights+optimizer", False, dict(engine_state=True, optimizer=True)),
    ("weights+optimizer", True, dict(engine_state=True)),
    ("all", False, dict(engine_state=True, optimizer=True, data_position=True)),
])
def test_init_from_checkpoint_restores_what_model_load_asks(tmp_path, austen_data, parent, load, reset, want):
    plan, _ = _plan(tmp_path / "run", austen_data, **{"model.init_from": str(parent), "model.load": load,
                                                     "model.reset_optimizer": reset})
    source = parent / "checkpoints" / "step-00000004"
    assert plan == StartPlan("init", str(source), masks=True, last_lr=plan.last_lr, **want)
    assert plan.last_lr > 0  # the parent's last LR: where a rewarm starts
    assert not plan.counters  # a new run: its own step and token counters


def test_resume_wins_over_init_from(tmp_path, austen_data, parent, hf_dir):
    run_dir = tmp_path / "cont"
    shutil.copytree(parent, run_dir)
    plan, _ = _plan(run_dir, austen_data, resume=True, **{"model.init_from": str(hf_dir)})
    assert plan.kind == "resume" and Path(plan.source).parent.parent == run_dir


def test_resume_refuses_another_shape(parent, austen_data):
    with pytest.raises(UserError, match="checkpoint model differs from the config in dim"):
        _plan(parent, austen_data, resume=True, **{"model.dim": 96})
