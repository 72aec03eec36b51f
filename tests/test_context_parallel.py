"""Context parallelism on CPU ranks (gloo) against one process on the same global batch: every layout
gives the one-process run's per-step losses and gradient norms (fp32, rtol 1e-5) over 10 steps with
document masking, for a Llama shape (grouped-query attention) and a sliding-window family (Qwen3 with
sliding and full layers), under the local engine (DDP), FSDP2 and DeepSpeed ZeRO,
each keeping a weight EMA; and a checkpoint
saved at cp=2 resumes at cp=1 and then at dp=2 x cp=2 with the uninterrupted run's losses.

Two launches (2 and 4 ranks) run several jobs each (tests/dist_worker.py), since a launch costs
seconds of startup. Measured: every layout matches the reference to ~3e-7 relative.
"""
import json
import shutil
import sys
from pathlib import Path

import pytest

from cptrain.errors import UserError
from cptrain.trainer.config import load_config
from tests.conftest import tiny_overrides
from tests.multiproc import free_port, run_processes

pytestmark = [pytest.mark.cp, pytest.mark.distributed]
WORKER = Path(__file__).with_name("dist_worker.py")
STEPS, TOKENS_PER_STEP, RTOL = 10, 1024, 1e-5
# Grouped-query attention with 4 key/value heads: Ulysses splits them up to 4 ways.
LLAMA = {"model.n_heads": 8, "model.n_kv_heads": 4}
SLIDING = {**LLAMA, "model.family": "qwen3", "model.qk_norm": "head", "model.sliding_window": 24,
           "model.layer_types": "[sliding, full]"}
ULYSSES = lambda cp: {"parallel.cp": cp, "parallel.cp_method": "ulysses"}  # noqa: E731
RING = lambda cp: {"parallel.cp": cp, "parallel.cp_method": "ring"}  # noqa: E731
FSDP2, ZERO = {"train.engine": "fsdp2"}, lambda stage: {"train.engine": "deepspeed", "deepspeed.zero_stage": stage}  # noqa: E731
TWO_RANKS = {"llama_ulysses2_ddp": {**LLAMA, **ULYSSES(2)},
             "llama_ring2_fsdp2": {**LLAMA, **RING(2), **FSDP2},
             "sliding_ring2_zero2": {**SLIDING, **RING(2), **ZERO(2)},
             "sliding_ulysses2_zero3": {**SLIDING, **ULYSSES(2), **ZERO(3)}}
FOUR_RANKS = {"llama_ring4_ddp": {**LLAMA, **RING(4)},
              "llama_ulysses4_fsdp2": {**LLAMA, **ULYSSES(4), **FSDP2},
              "llama_dp2_ulysses2_fsdp2": {**LLAMA, **ULYSSES(2), **FSDP2},
              "sliding_dp2_ring2_zero1": {**SLIDING, **RING(2), **ZERO(1)}}


def _overrides(run_dir: Path, data: Path, **extra) -> list[str]:
    base = {"train.max_tokens": STEPS * TOKENS_PER_STEP, "train.global_batch_tokens": TOKENS_PER_STEP,
            "train.precision": "fp32", "train.device": "cpu", "eval.at_start": False, "eval.interval_tokens": 5 * TOKENS_PER_STEP,
            "checkpoint.interval_tokens": 4 * TOKENS_PER_STEP, "train.ema_decay": 0.9}
    return tiny_overrides(run_dir, data, **{**base, **extra})


def _launch(root: Path, name: str, world: int, jobs: list[dict]) -> None:
    (root / f"{name}.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(free_port()),
           str(WORKER), str(root / f"{name}.json")]
    run_processes([cmd], timeout=900)


def _rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def _rewind(run_dir: Path, step: int) -> None:
    for c in (run_dir / "checkpoints").glob("step-*"):
        if int(c.name.split("-")[1]) > step:
            shutil.rmtree(c)
    (run_dir / "checkpoints" / "latest").write_text(f"step-{step:08d}\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, austen_data):
    from cptrain.trainer.loop import run

    root = tmp_path_factory.mktemp("cp")
    d = {name: root / name for name in ("llama", "sliding", *TWO_RANKS, *FOUR_RANKS, "resumed")}
    run(load_config(None, _overrides(d["llama"], austen_data, **LLAMA)))
    run(load_config(None, _overrides(d["sliding"], austen_data, **SLIDING)))
    _launch(root, "two", 2, [{"overrides": _overrides(d[n], austen_data, **x)} for n, x in TWO_RANKS.items()])
    # The cp=2 run's step-4 checkpoint, resumed by one process (cp=1) ...
    shutil.copytree(d["llama_ring2_fsdp2"], d["resumed"])
    _rewind(d["resumed"], 4)
    run(load_config(None, _overrides(d["resumed"], austen_data, **LLAMA, **FSDP2)), resume=True)
    # ... and its step-8 checkpoint by dp=2 x cp=2, in the 4-rank launch.
    _rewind(d["resumed"], 8)
    resumed = {"overrides": _overrides(d["resumed"], austen_data, **LLAMA, **RING(2), **FSDP2), "resume": True}
    _launch(root, "four", 4, [{"overrides": _overrides(d[n], austen_data, **x)} for n, x in FOUR_RANKS.items()] + [resumed])
    return d


@pytest.mark.parametrize("method", ["ulysses", "ring"])
def test_logits_through_a_split_equal_those_of_whole_rows(method):
    """tests/cp_worker.py: Llama, Mistral (windows) and Gemma 2 (soft-capped scores, custom scale)."""
    run_processes([[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    str(Path(__file__).with_name("cp_worker.py")), method]], timeout=300)


@pytest.mark.parametrize("name", [*TWO_RANKS, *FOUR_RANKS])
def test_every_layout_matches_one_process(runs, name):
    want = _rows(runs["sliding" if name.startswith("sliding") else "llama"])
    got = _rows(runs[name])
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, row in want.items():
        for key in ("loss", "grad_norm", "val/austen"):
            if key in row:
                assert got[step][key] == pytest.approx(row[key], rel=RTOL), (name, step, key)


def test_a_cp2_checkpoint_resumes_at_cp1_and_at_dp2_cp2(runs):
    want, got = _rows(runs["llama"]), _rows(runs["resumed"])
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(5, STEPS + 1):  # 5-8 trained by one process, 9-10 by dp=2 x cp=2
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=RTOL), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=RTOL), step


@pytest.mark.parametrize("extra, message", [
    ({**LLAMA, **ULYSSES(8)}, "splits the attention heads"),
    ({**RING(3), "data.seq_len": 64}, "does not split into 6 equal pieces"),
    ({**RING(2), "reweighting.instance.strategy": "linupper"}, "reweighting.instance"),
    ({"parallel.cp": 0}, "must be at least 1"),
])
def test_bad_layouts_fail_in_one_line(tmp_path, austen_data, extra, message):
    with pytest.raises(UserError, match=message) as e:
        load_config(None, tiny_overrides(tmp_path, austen_data, **extra))
    assert "\n" not in str(e.value)


def test_world_size_not_divisible_fails_before_work():
    from cptrain.trainer.engines.layout import Layout

    with pytest.raises(UserError, match="does not divide the 3 processes"):
        Layout(0, 3, 0, cp=2)


def test_launch_checks_the_layout_against_the_processes_it_starts(tmp_path, austen_data, capsys):
    from cptrain.launch.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    args = ["launch", "--launcher", "torchrun", "--gpus-per-node", "4", "--dry-run", str(cfg),
            *tiny_overrides(tmp_path / "run", austen_data, **RING(2))]
    assert main(args) == 0
    assert "4 processes on cpu: 2 data-parallel x 2 context-parallel (ring)" in capsys.readouterr().out
    assert main(args[:4] + ["3"] + args[5:]) == 2
    assert "parallel.cp=2 does not divide the 3 processes" in capsys.readouterr().err
