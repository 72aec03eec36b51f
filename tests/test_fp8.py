"""FP8 training on CPU (torchao's emulated FP8 matmuls; the kernels and the numerics are GPU work,
bench/gpu_check.sh): which linears convert, that runs train and keep ordinary checkpoints (an FP8
run resumes without FP8 and exports unchanged), FSDP2 with FP8 all-gather on two ranks, and the
one-line refusals."""
import dataclasses
import json
import shutil
from argparse import Namespace

import pytest
import torch
from safetensors.torch import load_file

from cptrain.errors import UserError
from cptrain.launch.cli import main as cli
from cptrain.launch.launchers import torchrun_command
from cptrain.model.decoder import Decoder
from cptrain.model.presets import preset
from cptrain.trainer import checkpoint as ckpt
from cptrain.trainer.config import load_config
from cptrain.trainer.engines.fp8 import fp8_filter
from cptrain.trainer.loop import Trainer, run
from tests.conftest import tiny_overrides
from tests.multiproc import free_port, run_processes

pytestmark = pytest.mark.fp8
pytest.importorskip("torchao")
FP8 = {"model.n_layers": 4, "train.fp8_emulate": True, "train.fp8_min_features": 16, "train.max_tokens": 4096,
       "checkpoint.interval_tokens": 2048}


def test_the_filter_keeps_ends_small_linears_and_the_head_in_bf16():
    with torch.device("meta"):
        model = Decoder(dataclasses.replace(preset("1.3B"), n_layers=6))
        small = Decoder(dataclasses.replace(preset("1.3B"), n_layers=3, n_kv_heads=2))  # wk/wv: 2048 -> 256
    choose = fp8_filter(model, min_features=1024, keep_ends=True)
    chosen = {n for n, m in model.named_modules() if choose(m, n)}
    assert chosen == {f"layers.{i}.{w}" for i in (1, 2, 3, 4) for w in
                      ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                       "feed_forward.w3")}
    choose = fp8_filter(small, min_features=1024, keep_ends=False)
    assert {n for n, m in small.named_modules() if choose(m, n) and "attention.wk" in n} == set()
    assert not choose(small.output, "output") and not choose(small.tok_embeddings, "tok_embeddings")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_an_fp8_run_trains_keeps_ordinary_checkpoints_and_resumes_without_fp8(austen_data, tmp_path, recipe):
    run_dir = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny_overrides(run_dir, austen_data, **{**FP8, "train.fp8": recipe})))
    kinds = {n: type(m).__name__ for n, m in trainer.engine.model.named_modules() if n.endswith("feed_forward.w1")}
    assert kinds == {"layers.0.feed_forward.w1": "Linear", "layers.1.feed_forward.w1": "Float8Linear",
                     "layers.2.feed_forward.w1": "Float8Linear", "layers.3.feed_forward.w1": "Linear"}
    rows = trainer.train()
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    plain = tmp_path / "plain"
    run(load_config(None, tiny_overrides(plain, austen_data, **{**FP8, "train.max_tokens": 2048})))
    names = lambda d: set(json.loads((d / "checkpoints" / "step-00000002" / "manifest.json").read_text())["files"])  # noqa: E731
    assert names(run_dir) == names(plain)
    a = load_file(str(run_dir / "checkpoints" / "step-00000002" / "model.safetensors"))
    b = load_file(str(plain / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype == torch.float32 for k in a)
    # Resumed without FP8 from the FP8 run's step-2 checkpoint, and exported as usual.
    (run_dir / "checkpoints" / "latest").write_text("step-00000002\n")
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")
    resumed = run(load_config(None, tiny_overrides(run_dir, austen_data, **FP8)), resume=True)
    assert [r["step"] for r in resumed if "loss" in r] == [3, 4]
    assert cli(["convert", "cptrain-to-hf", str(run_dir), str(tmp_path / "hf")]) == 0


@pytest.mark.distributed
def test_fsdp2_with_fp8_all_gather_on_two_ranks(austen_data, tmp_path):
    extra = {**FP8, "train.fp8": "tensorwise", "train.engine": "fsdp2", "train.device": "cpu", "train.precision": "fp32",
             "train.global_batch_tokens": 2048}
    jobs = [{"overrides": tiny_overrides(tmp_path / "fsdp", austen_data, **extra)}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    args = Namespace(nodes=1, gpus_per_node=2, hostfile=None, master_addr=None, master_port=free_port(), no_ssh=False,
                     node_rank=None)
    run_processes([torchrun_command(args, ["tests/dist_worker.py", str(tmp_path / "jobs.json")], tmp_path)], timeout=300)
    rows = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert ckpt.verify(tmp_path / "fsdp" / "checkpoints" / "step-00000002") is None
    assert cli(["convert", "cptrain-to-hf", str(tmp_path / "fsdp"), str(tmp_path / "hf")]) == 0  # plain weights


def test_fp8_is_refused_where_it_cannot_run(austen_data, tmp_path):
    with pytest.raises(UserError, match="train.fp8 with deepspeed.zero_stage=3 is not supported"):
        load_config(None, tiny_overrides(tmp_path, austen_data, **{"train.fp8": "tensorwise", "train.engine": "deepspeed",
                                                                   "deepspeed.zero_stage": 3}))
    with pytest.raises(UserError, match="train.fp8=rowwise needs a GPU with FP8 tensor cores"):
        Trainer(load_config(None, tiny_overrides(tmp_path / "cpu", austen_data, **{"model.n_layers": 4, "train.fp8": "rowwise"})))
    with pytest.raises(UserError, match="no linear qualifies"):
        Trainer(load_config(None, tiny_overrides(tmp_path / "small", austen_data, **{"train.fp8": "tensorwise",
                                                                                    "train.fp8_emulate": True})))
