"""Checkpoint merging and the weight EMA (trainer/averaging.py, `cptrain merge`): WSM's coefficients
emulate a decay, merged weights are their sources' weighted mean tensor for tensor, the merged
folder trains, evaluates, anneals and exports, and the EMA follows its recursion and resumes bit
for bit. The EMA under DDP, ZeRO-0..3 and FSDP2 (resumed at another world size) is checked in
tests/test_distributed.py's chain."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cptrain.errors import UserError
from cptrain.launch.cli import main as cli
from cptrain.trainer.averaging import EMA_FILE, ema_weights, merge_coefficients, shape_coefficients
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import run
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.merge
EVERY_STEP = {"train.max_tokens": 6144, "checkpoint.interval_tokens": 1024, "checkpoint.keep_last": 10,
              "eval.at_start": False, "schedule.warmup_tokens": 0, "schedule.kind": "constant"}


@pytest.mark.parametrize("shape, decay", [("linear", lambda u: 1 - u), ("cosine", lambda u: (1 + torch.cos(torch.pi * u)) / 2),
                                          ("1-sqrt", lambda u: 1 - u.sqrt())])
def test_merge_coefficients_emulate_the_decay_they_name(shape, decay):
    """theta_i = theta_0 + u_1 + ... + u_i: merging theta_1..theta_k with WSM's coefficients equals
    theta_1 plus each later update scaled by the decay at its interval's middle."""
    k, gen = 6, torch.Generator().manual_seed(0)
    updates = torch.randn(k, 32, generator=gen)
    thetas = torch.cumsum(updates, 0)
    c = torch.tensor(shape_coefficients(k, shape))
    assert c.sum() == pytest.approx(1.0) and (c >= 0).all()
    middles = (torch.arange(2, k + 1) - 1.5) / (k - 1)
    emulated = thetas[0] + (decay(middles)[:, None] * updates[1:]).sum(0)
    torch.testing.assert_close((c[:, None] * thetas).sum(0), emulated)
    if shape == "linear":  # the trapezoid rule's weights
        torch.testing.assert_close(c, torch.tensor([0.1, 0.2, 0.2, 0.2, 0.2, 0.1]))


def test_merge_coefficients_refuse_what_is_not_an_average():
    assert merge_coefficients(4, None, None) == [0.25] * 4
    with pytest.raises(UserError, match="--weights has 2 values for 3 checkpoints"):
        merge_coefficients(3, [0.5, 0.5], None)
    with pytest.raises(UserError, match="--weights sum to 0.9"):
        merge_coefficients(2, [0.5, 0.4], None)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, austen_data):
    """A constant-LR run with a checkpoint after every step and an EMA of the weights (decay 0.8)."""
    run_dir = tmp_path_factory.mktemp("merge") / "run"
    run(load_config(None, tiny_overrides(run_dir, austen_data, **EVERY_STEP, **{"train.ema_decay": 0.8})))
    return run_dir


def _weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def test_merged_weights_are_the_weighted_mean_of_their_sources(ema_run, tmp_path, austen_data):
    assert cli(["merge", str(ema_run), "--last", "3", "--out", str(tmp_path / "mean")]) == 0
    merged = load_file(str(tmp_path / "mean" / "model.safetensors"))
    sources = [_weights(ema_run, s) for s in (4, 5, 6)]
    assert merged.keys() == sources[0].keys()
    for name in merged:
        torch.testing.assert_close(merged[name], (sources[0][name] + sources[1][name] + sources[2][name]) / 3, rtol=1e-6, atol=1e-8)  # fp32 rounding
    assert not all(torch.equal(sources[0][n], sources[2][n]) for n in merged), "the sources differ"

    assert cli(["merge", str(ema_run), "--steps", "2,6", "--weights", "0.25", "0.75", "--out", str(tmp_path / "w")]) == 0
    merged = load_file(str(tmp_path / "w" / "model.safetensors"))
    a, b = _weights(ema_run, 2), _weights(ema_run, 6)
    for name in merged:
        torch.testing.assert_close(merged[name], 0.25 * a[name] + 0.75 * b[name], rtol=1e-6, atol=1e-8)  # fp32 rounding
    info = json.loads((tmp_path / "w" / "merge.json").read_text())
    assert info["coefficients"] == [0.25, 0.75] and len(info["checkpoints"]) == 2

    # The merged folder is a checkpoint like any other: it evaluates, exports, trains and anneals.
    assert cli(["eval", str(tmp_path / "mean"), "--data", str(austen_data), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["loss"] > 0
    assert cli(["convert", "cptrain-to-hf", str(tmp_path / "mean"), str(tmp_path / "hf")]) == 0
    rows = run(load_config(None, tiny_overrides(tmp_path / "anneal", austen_data, **{
        "model.init_from": str(tmp_path / "mean"), "train.max_tokens": 2048, "schedule.kind": "linear",
        "schedule.warmup_tokens": 0, "eval.at_start": False})))
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and rows[-1]["lr"] < rows[0]["lr"]


def cli_raise(argv):
    """The command's body, so the UserError (which the CLI prints as one line) reaches the test."""
    from cptrain.launch import commands
    from cptrain.launch.cli import build_parser

    return commands.merge(build_parser().parse_args(argv))


def test_merge_refuses_bad_requests(ema_run, tmp_path):
    with pytest.raises(UserError, match=r"no checkpoint of step \[3000\]"):
        cli_raise(["merge", str(ema_run), "--steps", "2,3000", "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="--last 40: .* has only 6 checkpoints"):
        cli_raise(["merge", str(ema_run), "--last", "40", "--out", str(tmp_path / "x")])
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="exists; pick a new --out"):
        cli_raise(["merge", str(ema_run), "--last", "2", "--out", str(tmp_path / "taken")])
    with pytest.raises(UserError, match="no checkpoints to merge"):
        cli_raise(["merge", str(tmp_path), "--last", "2", "--out", str(tmp_path / "y")])


def test_the_ema_follows_its_recursion_and_merges(ema_run, tmp_path):
    """EMA_t = d EMA_{t-1} + (1 - d) theta_t, checked against every step's saved weights."""
    d = 0.8
    emas = {s: ema_weights(ema_run / "checkpoints" / f"step-{s:08d}")[1] for s in range(1, 7)}
    for s in range(2, 7):
        theta = _weights(ema_run, s)
        for name, value in emas[s].items():
            torch.testing.assert_close(value, d * emas[s - 1][name] + (1 - d) * theta[name], rtol=1e-6, atol=1e-7)
    assert cli(["merge", str(ema_run), "--last", "1", "--ema", "--out", str(tmp_path / "ema")]) == 0
    got = load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert all(torch.equal(got[n], emas[6][n]) for n in got)


@pytest.mark.resume
def test_the_ema_resumes_bit_for_bit(ema_run, tmp_path, austen_data):
    run_dir = tmp_path / "run"
    shutil.copytree(ema_run, run_dir)
    for s in (4, 5, 6):
        shutil.rmtree(run_dir / "checkpoints" / f"step-{s:08d}")
    (run_dir / "checkpoints" / "latest").write_text("step-00000003\n")
    run(load_config(None, tiny_overrides(run_dir, austen_data, **EVERY_STEP, **{"train.ema_decay": 0.8})), resume=True)
    for s in (4, 5, 6):
        name = EMA_FILE.format(rank=0)
        want = load_file(str(ema_run / "checkpoints" / f"step-{s:08d}" / name))
        got = load_file(str(run_dir / "checkpoints" / f"step-{s:08d}" / name))
        assert all(torch.equal(got[n], want[n]) for n in want), s
    with pytest.raises(UserError, match=r"train.ema_decay=1.0 must be in \[0, 1\)"):
        load_config(None, tiny_overrides(run_dir, austen_data, **{"train.ema_decay": 1.0}))
