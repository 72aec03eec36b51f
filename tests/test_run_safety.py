"""Run safety: token budgets end runs whatever the batch size, a run directory holds one run, the
record of a run is never lost, resume takes `latest` (rank 0 decides, every rank verifies a share),
asynchronous checkpoints are as atomic as synchronous ones, bad input is one line."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cptrain.errors import UserError
from cptrain.launch.cli import main as cli
from cptrain.trainer import checkpoint as ckpt
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import run
from tests.conftest import FIXTURES, tiny_overrides
from tests.multiproc import run_ranks

pytestmark = [pytest.mark.resume, pytest.mark.faults]


def _cfg(run_dir, data, **extra):
    return load_config(None, tiny_overrides(run_dir, data, **{"eval.at_start": False, **extra}))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rewind(run_dir: Path, step: int) -> None:
    """The run stopped after its checkpoint `step`: what came later never happened on disk."""
    for c in ckpt.list_checkpoints(run_dir / "checkpoints"):
        if ckpt.step_of(c) > step:
            shutil.rmtree(c)
    (run_dir / "checkpoints" / "latest").write_text(f"step-{step:08d}\n")


@pytest.fixture(scope="module")
def half_run(austen_data, tmp_path_factory) -> Path:
    """A 40,960-token run (1,024 a step) that stopped at its step-20 checkpoint (20,480 tokens)."""
    run_dir = tmp_path_factory.mktemp("half") / "run"
    run(_cfg(run_dir, austen_data, **{"train.max_tokens": 40960, "checkpoint.interval_tokens": 20480}))
    _rewind(run_dir, 20)
    return run_dir


@pytest.mark.parametrize("batch", [2048, 512])
def test_tokens_end_the_run_whatever_the_batch(half_run, austen_data, tmp_path, batch):
    run_dir = shutil.copytree(half_run, tmp_path / "run")
    rows = run(_cfg(run_dir, austen_data, **{"train.max_tokens": 40960, "train.global_batch_tokens": batch,
                                            "checkpoint.interval_tokens": 20480}), resume=True)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 20480 // batch and steps[-1]["tokens"] == 40960
    assert ckpt.read_state(run_dir / "checkpoints" / f"step-{steps[-1]['step']:08d}")["progress"]["tokens"] == 40960


def test_a_budget_between_steps_is_rounded_down_with_a_line(tmp_path, austen_data, capsys):
    rows = run(_cfg(tmp_path / "run", austen_data, **{"train.max_tokens": 5000}))
    assert rows[-1]["tokens"] == 4096 and rows[-1]["step"] == 4
    assert "train.max_tokens=5,000 is not a whole number of steps of train.global_batch_tokens=1,024 from 0 tokens: " \
           "this run ends at 4,096 tokens" in capsys.readouterr().out


def test_a_run_directory_holds_one_run(tmp_path, austen_data, capsys):
    run_dir = tmp_path / "run"
    first = {"train.max_tokens": 4096, "checkpoint.interval_tokens": 2048}
    run(_cfg(run_dir, austen_data, **first))
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=rf"^{run_dir} holds a run \(config.yaml, metrics.jsonl, 2 checkpoints\); "
                                        r"continue it with --resume, or start anew in another directory with --run_dir=NEW"):
        run(_cfg(run_dir, austen_data, **{"train.max_tokens": 2048}))
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # untouched
    # Through the command: one line, exit 2.
    (tmp_path / "c.yaml").write_text("{}\n")
    r = subprocess.run([sys.executable, "-m", "cptrain.launch.cli", "train", str(tmp_path / "c.yaml"),
                        *tiny_overrides(run_dir, austen_data)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--resume" in r.stderr, r.stderr
    # --overwrite moves the old run aside, whole, and starts anew.
    capsys.readouterr()
    run(_cfg(run_dir, austen_data, **{"train.max_tokens": 2048}), overwrite=True)
    (aside,) = tmp_path.glob("run.replaced-*")
    assert f"--overwrite: moved the run that was in {run_dir} to {aside}" in capsys.readouterr().out
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == before
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step-00000002"]
    assert [r["step"] for r in _rows(run_dir / "metrics.jsonl")] == [1, 2]


def test_rows_past_a_resume_are_set_aside_not_lost(half_run, austen_data, tmp_path):
    run_dir = shutil.copytree(half_run, tmp_path / "run")
    logged = _rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, 41))
    run(_cfg(run_dir, austen_data, **{"train.max_tokens": 40960, "checkpoint.interval_tokens": 20480}), resume=True)
    assert [r["step"] for r in _rows(run_dir / "metrics.jsonl")] == list(range(1, 41))
    assert _rows(run_dir / "metrics.dropped.jsonl") == logged[20:]  # the first attempt's steps 21-40, whole


def test_resume_takes_latest_when_it_verifies(tmp_path, austen_data, capsys):
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, austen_data, **{"train.max_tokens": 6144, "checkpoint.interval_tokens": 2048})
    run(cfg)
    root = run_dir / "checkpoints"
    (root / "latest").write_text("step-00000004\n")  # e.g. set by hand to go back one checkpoint
    assert ckpt.find_resume(run_dir) == root / "step-00000004"
    (root / "step-00000004" / "optimizer.pt").write_bytes(b"damaged")
    skipped = []
    assert ckpt.find_resume(run_dir, log=skipped.append) == root / "step-00000006"  # else the newest good one
    size = json.loads((root / "step-00000004" / "manifest.json").read_text())["files"]["optimizer.pt"]["size"]
    assert skipped == [f"skipping checkpoint {root / 'step-00000004'}: optimizer.pt has 7 bytes, manifest says {size} (truncated?)"]


def test_verification_shares_are_disjoint_complete_and_balanced():
    entries = {f"f{i}": {"size": size} for i, size in enumerate([900, 500, 400, 300, 300, 100, 50, 10])}
    for world in (1, 2, 3, 5):
        shares = [ckpt._share(entries, world, r) for r in range(world)]
        assert sorted(sum(shares, [])) == sorted(entries)
        loads = [sum(entries[f]["size"] for f in s) for s in shares]
        assert max(loads) - min(loads) <= 900  # within the largest file of each other


def test_two_ranks_decide_on_rank0_and_verify_a_share_each(tmp_path, austen_data):
    run_dir = tmp_path / "run"
    run(_cfg(run_dir, austen_data, **{"train.max_tokens": 4096, "checkpoint.interval_tokens": 2048}))
    newest = run_dir / "checkpoints" / "step-00000004"
    entries = json.loads((newest / "manifest.json").read_text())["files"]
    damaged = ckpt._share(entries, 2, 1)[0]  # a file only rank 1 hashes
    (newest / damaged).write_bytes(b"x" * entries[damaged]["size"])  # same size: only its hash can tell
    out = tmp_path / "out"
    run_ranks([sys.executable, "-m", "tests.ckpt_worker", str(run_dir), str(out)], 2)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, rep in enumerate(reports):
        assert rep["decided"] == 0, "every rank takes rank 0's decision"
        assert rep["picked"] == str(run_dir / "checkpoints" / "step-00000002")
        assert rep["skipped"] == [f"skipping checkpoint {newest}: {damaged} checksum mismatch (corrupted)"]
    assert set(reports[0]["share"]).isdisjoint(reports[1]["share"])
    assert set(reports[0]["share"]) | set(reports[1]["share"]) == set(entries)


@pytest.fixture(scope="module")
def reference(austen_data, tmp_path_factory) -> list:
    return run(_cfg(tmp_path_factory.mktemp("ref") / "run", austen_data, **{"train.max_tokens": 8192}))


def test_async_checkpoints_train_the_same_and_resume_exactly(tmp_path, austen_data, reference):
    run_dir = tmp_path / "run"
    extra = {"train.max_tokens": 8192, "checkpoint.interval_tokens": 2048, "checkpoint.async": True, "checkpoint.keep_last": 10}
    assert _same(run(_cfg(run_dir, austen_data, **extra)), reference)  # a background save changes nothing
    root = run_dir / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == [f"step-{s:08d}" for s in (8, 6, 4, 2)]
    assert all(ckpt.verify(c) is None for c in ckpt.list_checkpoints(root)) and not list(root.glob(".tmp-*"))
    _rewind(run_dir, 4)
    resumed = run(_cfg(run_dir, austen_data, **extra), resume=True)
    assert _same(resumed, [r for r in reference if r["step"] > 4])


def _same(rows: list, want: list) -> bool:
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rs]  # noqa: E731
    return strip(rows) == strip(want)


def test_bad_token_counts_and_a_forgetting_report_without_baseline(tmp_path, austen_data, capsys):
    assert cli(["train", str(FIXTURES.parent.parent / "trainer/configs/demo.yaml"), "--train.max_tokens=1.2.3"]) == 2
    assert capsys.readouterr().err.strip() == ("cptrain: error: trainer/configs/demo.yaml: train.max_tokens must be an integer "
                                               "(suffixes K/M/B/T allowed), got '1.2.3'").replace(
        "trainer/configs/demo.yaml", str(FIXTURES.parent.parent / "trainer/configs/demo.yaml"))
    run_dir = tmp_path / "run"
    run(_cfg(run_dir, austen_data, **{"train.max_tokens": 2048, "continual.report": "on",
                                     "data.val_domains": f"[{{name: old, path: {austen_data}}}]"}))
    out = capsys.readouterr().out
    assert "no baseline: the run has no evaluation before its first step" in out and "+0.0000" not in out
    assert json.loads((run_dir / "forgetting.json").read_text())["domains"]["old"]["change"] is None


def test_a_checkpoint_written_before_the_add_on_files_resumes_exactly(tmp_path, monkeypatch):
    """tests/fixtures/checkpoint_v1: step 10 of a 20-step run saved by cptrain before add-ons kept
    state files of their own (fault and reweighting counters inside trainer_state.json's progress),
    with sparsity masks, a weight EMA and online domain weights in play. Resumed now, it must train
    steps 11-20 as the uninterrupted run did then (expected_after_resume.json)."""
    work = tmp_path / "v1"
    shutil.copytree(FIXTURES / "checkpoint_v1", work)
    monkeypatch.chdir(work)  # the run's paths are relative to it
    run(load_config("run/config.yaml"), resume=True)
    got = {r["step"]: r for r in _rows(work / "run" / "metrics.jsonl") if r["step"] > 10}
    for want in json.loads((work / "expected_after_resume.json").read_text()):
        row = got[want["step"]]
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-5), (want["step"], key)
    final = work / "run" / "checkpoints" / "step-00000020"
    assert (final / "faults.json").is_file() and (final / "reweighting.json").is_file()
    assert "faults" not in ckpt.read_state(final)["progress"]
