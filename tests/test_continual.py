"""Continual pretraining: anneal branches, starting from HF folders and checkpoints, the forgetting report."""
import hashlib
import json
from pathlib import Path

import pytest

from cptrain.launch.cli import main as cli
from cptrain.errors import UserError
from tests.conftest import tiny_overrides
from cptrain.trainer.checkpoint import verify
from cptrain.trainer.config import load_config
from cptrain.trainer.branch import prepare_branch
from cptrain.trainer.loop import run

STEP = 1024  # tokens per step of tiny_overrides


def _cfg(run_dir, data, **extra):
    return load_config(None, tiny_overrides(run_dir, data, **extra))


def _rows(run_dir) -> list:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _losses(rows) -> dict:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.schedules
@pytest.mark.resume
def test_anneal_branch_continues_parent_and_leaves_it_alone(tmp_path, austen_data):
    parent = tmp_path / "main"
    run(_cfg(parent, austen_data, **{"train.max_tokens": 12288, "schedule.kind": "wsd", "schedule.warmup_tokens": 2048,
                                     "schedule.decay_fraction": 0.25, "checkpoint.interval_tokens": 4096, "checkpoint.keep_last": 10}))
    before = _digest(parent)
    branch = tmp_path / "branch"
    assert cli(["anneal", str(parent), "--checkpoint", "step-00000008", "--tokens", "4096", "--shape", "linear",
                "--out", str(branch), "--checkpoint.keep_last=1", "--log.progress=false"]) == 0
    assert _digest(parent) == before, "the branch modified the main run"
    assert verify(parent / "checkpoints" / "step-00000008") is None
    assert [p.name for p in (branch / "checkpoints").iterdir() if p.is_dir()] == ["step-00000012"]  # its own link pruned

    main_rows, rows = _rows(parent), _rows(branch)
    assert [r["step"] for r in rows if r["step"] <= 8] == [r["step"] for r in main_rows if r["step"] <= 8]
    new = [r for r in rows if r["step"] > 8]
    assert [r["step"] for r in new] == [9, 10, 11, 12]
    assert new[0]["loss"] == _losses(main_rows)[9], "the branch's first step is the parent's next step"
    peak, floor = 3e-3, 3e-4  # tiny_overrides' lr, wsd min_lr_ratio 0.1
    assert main_rows[7]["lr"] == pytest.approx(peak)
    assert [r["lr"] for r in new] == pytest.approx([peak + (floor - peak) * k / 4 for k in range(1, 5)], rel=1e-9)
    assert json.loads((branch / "branch.json").read_text())["parent_lr"] == pytest.approx(peak)


@pytest.mark.schedules
def test_anneal_branch_refuses_decay_phase_and_foreign_out(tmp_path, austen_data):
    parent = tmp_path / "main"
    run(_cfg(parent, austen_data, **{"train.max_tokens": 4096, "schedule.kind": "wsd", "schedule.decay_fraction": 0.25,
                                     "checkpoint.interval_tokens": 1024, "checkpoint.keep_last": 10}))
    with pytest.raises(UserError, match="constant or power phase"):  # the decay starts at step 3
        prepare_branch(parent, tmp_path / "b", 2048, checkpoint="step-00000003")
    with pytest.raises(UserError, match="end of its run"):  # the latest, step 4, ends the decay
        prepare_branch(parent, tmp_path / "b", 2048)
    with pytest.raises(UserError, match="multiple of the parent's train.global_batch_tokens"):
        prepare_branch(parent, tmp_path / "b", 1000, checkpoint="step-00000002")
    with pytest.raises(UserError, match="--checkpoint must name one of"):
        prepare_branch(parent, tmp_path / "b", 2048, checkpoint="step-00000099")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(UserError, match="not an anneal branch"):
        prepare_branch(parent, tmp_path / "other", 2048, checkpoint="step-00000002")
    assert not (tmp_path / "b").exists(), "refused before writing anything"


@pytest.mark.hf
@pytest.mark.resume
def test_continual_from_hf_folder_and_forgetting_report(tmp_path, austen_data, spanish_data, capsys):
    source = tmp_path / "source"
    run(_cfg(source, austen_data, **{"train.max_tokens": 8192}))
    hf = tmp_path / "hf"
    assert cli(["convert", "cptrain-to-hf", str(source), str(hf)]) == 0
    source_val = [r["val/austen"] for r in _rows(source) if "val/austen" in r][-1]

    cont = tmp_path / "cont"
    cfg = _cfg(cont, spanish_data, **{
        "model.init_from": str(hf), "data.domains": f"[{{name: spanish, path: {spanish_data}}}]",
        "data.replay": f"[{{name: austen, path: {austen_data}}}]", "data.replay_fraction": 0.25,
        "train.max_tokens": 6144, "eval.interval_tokens": 2048,
        "schedule.kind": "rewarm", "schedule.warmup_tokens": 2048, "schedule.resume_lr": 3e-4})
    run(cfg)
    rows = _rows(cont)
    assert rows[0]["step"] == 0
    assert rows[0]["val/austen"] == pytest.approx(source_val, rel=1e-6), "the HF folder is the source model"
    assert rows[1]["lr"] == pytest.approx(3e-4 + (3e-3 - 3e-4) / 2)  # rewarm from resume_lr, half-way after one step

    rep = json.loads((cont / "forgetting.json").read_text())
    evals = {d: [r[f"val/{d}"] for r in rows if f"val/{d}" in r] for d in ("austen", "spanish")}
    assert [r["tokens"] for r in rows if "val/austen" in r] == [0, 2048, 4096, 6144]
    assert rep["domains"]["austen"]["role"] == "old" and rep["domains"]["spanish"]["role"] == "new"
    for d in ("austen", "spanish"):
        assert rep["domains"][d]["start"] == evals[d][0] and rep["domains"][d]["end"] == evals[d][-1]
        assert rep["domains"][d]["worst"] == max(evals[d][1:])
    assert rep["old"]["mean_change"] == pytest.approx(evals["austen"][-1] - evals["austen"][0])
    assert rep["new"]["mean_gain"] == pytest.approx(evals["spanish"][0] - evals["spanish"][-1])
    assert rep["new"]["mean_gain"] > 0.3, "training on Spanish lowers the Spanish loss"
    assert (cont / "forgetting.png").stat().st_size > 0
    md = (cont / "forgetting.md").read_text()
    assert "| austen | old |" in md and md in capsys.readouterr().out
    assert cli(["forgetting", str(cont), "--old", "austen", "--new", "spanish"]) == 0  # the same report, afterwards
    assert json.loads((cont / "forgetting.json").read_text()) == rep


@pytest.mark.resume
def test_load_modes_from_a_checkpoint(tmp_path, austen_data):
    parent = tmp_path / "main"
    run(_cfg(parent, austen_data, **{"train.max_tokens": 12288, "schedule.kind": "constant", "schedule.warmup_tokens": 2048,
                                     "checkpoint.interval_tokens": 10240, "checkpoint.keep_last": 5}))
    parent_loss, parent_lr = _losses(_rows(parent)), _rows(parent)[-1]["lr"]

    def cont(name, load, reset=False):
        cfg = _cfg(tmp_path / name, austen_data, **{
            "model.init_from": str(parent / "checkpoints" / "step-00000010"), "model.load": load,
            "model.reset_optimizer": reset, "train.max_tokens": 3072, "eval.at_start": False,
            "schedule.kind": "rewarm", "schedule.lr": 6e-3, "schedule.warmup_tokens": 2048})
        rows = run(cfg)
        return [r["loss"] for r in rows], [r["lr"] for r in rows]

    (weights, lrs), (with_opt, _), (reset, _), (everything, _) = (
        cont("w", "weights"), cont("wo", "weights+optimizer"), cont("r", "weights+optimizer", True), cont("a", "all"))
    assert lrs[0] == pytest.approx(parent_lr + (6e-3 - parent_lr) / 2), "the rewarm starts at the checkpoint's LR"
    assert everything[0] == parent_loss[11], "load=all continues the parent's data stream"
    assert weights[0] == with_opt[0] == reset[0] != parent_loss[11], "the other modes read the new data from its start"
    assert with_opt[1] != weights[1], "the optimizer moments change the first update"
    assert reset == weights, "reset_optimizer is weights-only training"
