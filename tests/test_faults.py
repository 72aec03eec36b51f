"""Fault injection on real runs: kill -9, signals, NaNs, loss spikes, damaged checkpoints and shards.

Runs are `cptrain train` subprocesses (killed or signalled when a file appears) or in-process
`run()` calls; a resumed run must reproduce the losses of an uninterrupted one exactly."""
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cptrain.launch.cli import main as cli_main
from tests.conftest import tiny_overrides
from cptrain.trainer import checkpoint as ckpt
from cptrain.trainer.config import load_config
from cptrain.trainer.addons import saved_state
from cptrain.trainer.faults import FaultMonitor, FaultsSection, GracefulStop, RunAborted
from cptrain.trainer.loop import run
from tests.multiproc import free_port, run_processes

STEPS = 12  # tiny model, 1024 tokens a step
REPO = Path(__file__).resolve().parent.parent


def _overrides(run_dir: Path, data: Path, **extra) -> list[str]:
    return tiny_overrides(run_dir, data, **{"train.max_tokens": STEPS * 1024, "eval.at_start": False, **extra})


def _cfg(run_dir: Path, data: Path, **extra):
    return load_config(None, _overrides(run_dir, data, **extra))


def _curve(rows) -> dict:
    return {r["step"]: (r["loss"], r["grad_norm"], r.get("val/austen")) for r in rows if "loss" in r}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, austen_data) -> dict:
    """The uninterrupted run every interrupted one is compared with."""
    return _curve(run(_cfg(tmp_path_factory.mktemp("ref") / "run", austen_data)))


class Launched:
    """`cptrain train` in its own process group, watched through the files it writes."""

    def __init__(self, run_dir: Path, data: Path, launcher: tuple = (), **extra):
        self.run_dir = run_dir
        empty = run_dir.parent / "empty.yaml"
        empty.write_text("{}\n")
        command = [*(launcher or [sys.executable]), "-m", "cptrain.launch.cli", "train", str(empty), *_overrides(run_dir, data, **extra)]
        self.proc = subprocess.Popen(command,
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)

    def wait_for(self, condition, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended before the fault was injected:\n{self.proc.stdout.read()}"
            assert time.monotonic() < deadline, "timed out waiting to inject the fault"
            time.sleep(0.02)

    def logged_step(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        rows = path.read_text().splitlines() if path.is_file() else []
        return max((json.loads(r)["step"] for r in rows if r.endswith("}")), default=-1)

    def finish(self, timeout: float = 180.0) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
            return self.proc.returncode, out
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _resume_and_compare(run_dir: Path, data: Path, reference: dict, from_step: int, capsys) -> str:
    capsys.readouterr()
    resumed = _curve(run(_cfg(run_dir, data), resume=True))
    assert resumed == {s: v for s, v in reference.items() if s > from_step}
    return capsys.readouterr().out


def _stopped_at(out: str, by: str) -> int:
    found = re.findall(rf"^stopped by {by} after step (\d+); saved checkpoint", out, re.MULTILINE)
    assert len(found) == 1, out
    return int(found[0])


@pytest.mark.faults
def test_stop_flag_from_sigusr1_and_a_quick_repeat_is_the_same_request():
    before = signal.getsignal(signal.SIGUSR1)
    with GracefulStop() as stop:
        assert not stop.agreed(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # within 1 s: not the "exit now" second signal
        assert stop.name == "SIGUSR1" and stop.agreed(torch.device("cpu"))
    assert signal.getsignal(signal.SIGUSR1) == before


@pytest.mark.faults
def test_monitor_policies():
    nan = float("nan")
    m = FaultMonitor(FaultsSection(max_consecutive_skips=2))
    assert m.judge(nan, 1)[0] == m.judge(float("inf"), 2)[0] == "skip"
    with pytest.raises(RunAborted, match="max_consecutive_skips=2"):
        m.judge(nan, 3)
    m = FaultMonitor(FaultsSection(spike_zscore=3, spike_window=4, spike_action="log"))
    for step, loss in enumerate([5.0, 4.9, 5.1, 5.0], 1):
        assert m.judge(loss, step) == ("update", "") and m.judge_norm(1.0, step) == ""
    verdict, note = m.judge(9.0, 5)
    assert verdict == "update" and "loss spike" in note and m.row() == {"loss_spikes": 1}
    assert m.judge_norm(nan, 5).startswith("step 5: gradient norm is nan") and m.row()["skipped_steps"] == 1
    restored = FaultMonitor(m.cfg)
    restored.load_state_dict(m.state_dict())
    assert restored.state_dict() == m.state_dict()


@pytest.mark.faults
@pytest.mark.resume
def test_kill9_mid_step_then_resume(tmp_path, austen_data, reference, capsys):
    run_dir = tmp_path / "run"
    job = Launched(run_dir, austen_data, **{"checkpoint.interval_tokens": 4096})
    job.wait_for(lambda: job.logged_step() >= 6)  # step-4 is complete; the run is between checkpoints
    job.kill9()
    good = ckpt.find_resume(run_dir)
    assert good is not None and ckpt.step_of(good) >= 4
    said = _resume_and_compare(run_dir, austen_data, reference, ckpt.step_of(good), capsys)
    assert f"resumed from {good}" in said


@pytest.mark.faults
@pytest.mark.resume
@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_kill9_mid_checkpoint_write_leaves_it_invisible(tmp_path, austen_data, reference, capsys, background):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    job = Launched(run_dir, austen_data, **{"checkpoint.interval_tokens": 4096, "faults.debug_checkpoint_delay_s": 2,
                                            "checkpoint.async": background})
    job.wait_for(lambda: (root / ".tmp-step-00000008" / "model.safetensors").is_file())  # files written, not published
    job.kill9()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000004"]
    assert (root / "latest").read_text().strip() == "step-00000004"
    said = _resume_and_compare(run_dir, austen_data, reference, 4, capsys)
    assert "skipping" not in said, said  # the half-written one was never a candidate
    assert not list(root.glob(".tmp-*")), "the next save cleans up what the killed one left"


@pytest.mark.faults
@pytest.mark.resume
def test_sigterm_saves_exits_0_and_resumes_exactly(tmp_path, austen_data, reference, capsys):
    run_dir = tmp_path / "run"
    job = Launched(run_dir, austen_data)  # no periodic checkpoints: the signal must cause one
    job.wait_for(lambda: job.logged_step() >= 1)
    job.proc.send_signal(signal.SIGTERM)
    rc, out = job.finish()
    assert rc == 0, out
    step = _stopped_at(out, "SIGTERM")
    assert 1 <= step < STEPS
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == [f"step-{step:08d}"]
    assert ckpt.verify(run_dir / "checkpoints" / f"step-{step:08d}") is None
    _resume_and_compare(run_dir, austen_data, reference, step, capsys)


@pytest.mark.faults
def test_second_signal_exits_at_once_without_publishing(tmp_path, austen_data):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    job = Launched(run_dir, austen_data, **{"faults.debug_checkpoint_delay_s": 60})
    job.wait_for(lambda: job.logged_step() >= 1)
    job.proc.send_signal(signal.SIGINT)  # first: stop after this step and save (the save hangs in the debug delay)
    first = time.monotonic()
    job.wait_for(lambda: any(root.glob(".tmp-*/model.safetensors")))
    time.sleep(max(0.0, first + 1.5 - time.monotonic()))  # a repeat within 1 s counts as the same signal
    t0 = time.monotonic()
    job.proc.send_signal(signal.SIGINT)
    rc, out = job.finish(timeout=30)
    assert rc == 128 + signal.SIGINT and time.monotonic() - t0 < 20, out
    assert "second signal (SIGINT): exiting now" in out
    assert ckpt.list_checkpoints(root) == [] and not (root / "latest").exists()
    assert ckpt.find_resume(run_dir) is None


@pytest.mark.faults
@pytest.mark.resume
def test_resume_without_checkpoint_starts_fresh(tmp_path, austen_data, capsys):
    rows = run(_cfg(tmp_path / "run", austen_data, **{"train.max_tokens": 2048}), resume=True)
    assert "no complete checkpoint in" in capsys.readouterr().out and rows[-1]["step"] == 2


@pytest.mark.faults
def test_nan_step_is_skipped_and_data_advances(tmp_path, austen_data):
    run_dir = tmp_path / "run"
    rows = run(_cfg(run_dir, austen_data, **{"train.max_tokens": 5120, "checkpoint.interval_tokens": 1024,
                                            "checkpoint.keep_last": 10, "faults.inject_nan_at_steps": "[3]"}))
    by_step = {r["step"]: r for r in _metrics(run_dir) if "loss" in r}
    assert by_step[3]["loss"] != by_step[3]["loss"] and by_step[3]["skipped_steps"] == 1
    assert by_step[3]["fault_action"] == "skip" and "loss is nan" in by_step[3]["fault"]
    assert all(torch.isfinite(torch.tensor(by_step[s]["loss"])) for s in (4, 5)) and by_step[5]["skipped_steps"] == 1
    root = run_dir / "checkpoints"
    w2, w3 = load_file(root / "step-00000002" / "model.safetensors"), load_file(root / "step-00000003" / "model.safetensors")
    assert all(torch.equal(w2[k], w3[k]) for k in w2), "the NaN step changed no weight"
    w4 = load_file(root / "step-00000004" / "model.safetensors")
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)
    pos = [ckpt.read_state(root / f"step-0000000{s}")["progress"]["data"]["position"] for s in (2, 3, 4)]
    assert pos[1] - pos[0] == pos[2] - pos[1] > 0, "the NaN batch was consumed, not retried"
    assert saved_state(root / "step-00000005", "faults")["skipped_steps"] == 1
    assert rows[-1]["step"] == 5


@pytest.mark.faults
def test_loss_spike_rolls_back_and_skips_the_data(tmp_path, austen_data, reference):
    run_dir = tmp_path / "run"
    spike = {"faults.spike_zscore": 6, "faults.spike_window": 4, "faults.spike_action": "rollback",
             "checkpoint.interval_tokens": 4096, "train.max_tokens": 12 * 1024}
    rows = run(_cfg(run_dir, austen_data, **spike, **{"faults.inject_spike_at_steps": "[7]"}))
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10, 11, 12]
    logged = _metrics(run_dir)
    back = [r for r in logged if r.get("fault_action") == "rollback"]
    assert len(back) == 1 and back[0]["step"] == 4 and "loss spike" in back[0]["fault"]
    steps = [r["step"] for r in logged if "loss" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), "the abandoned branch's rows are dropped"
    final = ckpt.read_state(run_dir / "checkpoints" / "step-00000012")["progress"]
    assert final["data"]["position"] == (12 + 3) * 16, "steps 5-7's batches were skipped, not replayed"
    assert saved_state(run_dir / "checkpoints" / "step-00000012", "faults")["rollbacks"] == 1
    with pytest.raises(RunAborted, match="max_rollbacks=1"):
        run(_cfg(tmp_path / "again", austen_data, **spike, **{"faults.inject_spike_at_steps": "[6, 7]", "faults.max_rollbacks": 1}))


@pytest.mark.faults
def test_damaged_checkpoint_files_are_skipped_with_the_reason(tmp_path, austen_data):
    run_dir = tmp_path / "run"
    run(_cfg(run_dir, austen_data, **{"train.max_tokens": 4096, "checkpoint.interval_tokens": 2048}))
    root = run_dir / "checkpoints"
    newest, older = root / "step-00000004", root / "step-00000002"
    files = sorted(p.name for p in newest.iterdir())
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "rng-rank0.pt", "config.yaml",
            "model_config.json", "manifest.json"} <= set(files)
    for name in files:
        path = newest / name
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x10
        for damage, data in (("truncated", original[: len(original) // 2]), ("bit flip", bytes(flipped))):
            path.write_bytes(data)
            skipped = []
            assert ckpt.find_resume(run_dir, log=skipped.append) == older, (name, damage)
            reason = skipped[0]
            if name == "manifest.json":
                assert "manifest" in reason or "missing" in reason or "checksum" in reason, reason
            else:
                assert name in reason and ("truncated" in reason if damage == "truncated" else "checksum" in reason), reason
            path.write_bytes(original)
        assert ckpt.verify(newest) is None
    (newest / "optimizer.pt").unlink()
    skipped = []
    assert ckpt.find_resume(run_dir, log=skipped.append) == older and "optimizer.pt missing" in skipped[0]


@pytest.mark.faults
def test_keep_last_never_deletes_the_only_good_checkpoint(tmp_path, austen_data, capsys):
    run_dir = tmp_path / "run"
    extra = {"train.max_tokens": 4096, "checkpoint.interval_tokens": 2048, "checkpoint.keep_last": 2}
    run(_cfg(run_dir, austen_data, **extra))
    root = run_dir / "checkpoints"
    (root / "step-00000004" / "model.safetensors").write_bytes(b"garbage")
    shutil.copytree(root / "step-00000004", root / "step-00000009")  # a newer, also damaged one
    capsys.readouterr()
    # keep_last=1: the resumed run skips both damaged ones, continues from step 2, replaces step 4.
    run(_cfg(run_dir, austen_data, **{**extra, "train.max_tokens": 6144, "checkpoint.keep_last": 1}), resume=True)
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "step-00000009" in out and f"resumed from {root / 'step-00000002'}" in out
    names = [p.name for p in ckpt.list_checkpoints(root)]
    assert names == ["step-00000009", "step-00000006"], "the damaged newer one did not push the good one out"
    assert ckpt.verify(root / "step-00000006") is None and ckpt.find_resume(run_dir, log=lambda _: None) == root / "step-00000006"
    assert (root / "latest").read_text().strip() == "step-00000006" and not list(root.glob(".tmp-*"))


@pytest.mark.faults
@pytest.mark.data
@pytest.mark.parametrize("damage", ["bit flip", "truncated"])
def test_damaged_shard_is_named_by_cptrain_train(tmp_path, austen_data, capsys, damage):
    data = tmp_path / "data"
    shutil.copytree(austen_data, data)
    shard = sorted((data / "train").rglob("shard.*.mds"))[0]
    raw = bytearray(shard.read_bytes())
    if damage == "bit flip":
        raw[len(raw) // 2] ^= 0x01
    else:
        del raw[len(raw) // 2:]
    shard.write_bytes(bytes(raw))
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    rc = cli_main(["train", str(empty), *_overrides(tmp_path / "run", data, **{"train.max_tokens": 2048})])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(shard) in err[0], err
    assert ("corrupt" if damage == "bit flip" else "index.json says") in err[0]


def _worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of this rank (its child with RANK=rank in the environment)."""
    for pid in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under {launcher_pid}")


@pytest.mark.faults
@pytest.mark.distributed
def test_two_ranks_skip_a_one_rank_nan_and_stop_together(tmp_path, austen_data):
    """Under torchrun (gloo), rank 1 alone sees a NaN, and rank 1 alone gets SIGTERM: both skip the
    same step, both stop after the same step with one checkpoint, and torchrun exits 0."""
    run_dir = tmp_path / "run"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()))
    job = Launched(run_dir, austen_data, launcher=torchrun, **{"faults.inject_nan_at_steps": "[2]", "faults.inject_rank": 1})
    job.wait_for(lambda: job.logged_step() >= 3)
    os.kill(_worker_pid(job.proc.pid, 1), signal.SIGTERM)
    rc, out = job.finish()
    assert rc == 0, out
    step = _stopped_at(out, "a stop signal on another rank")
    assert "received SIGTERM" in out
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == [f"step-{step:08d}"]
    by_step = {r["step"]: r for r in _metrics(run_dir) if "loss" in r}
    assert by_step[2]["loss"] != by_step[2]["loss"] and by_step[2]["skipped_steps"] == 1
    assert all(by_step[s]["loss"] == by_step[s]["loss"] for s in by_step if s != 2)


def _step_with(fused: bool, grad_fill: float | None, clip: float,
               dtype=torch.float32) -> tuple[list[torch.Tensor], torch.optim.Optimizer, float]:
    from cptrain.trainer.engines.base import clip_and_step

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32).to(dtype)), torch.nn.Parameter(torch.randn(32).to(dtype))]
    opt = torch.optim.AdamW(params, lr=0.0, fused=fused or None)
    gen = torch.Generator().manual_seed(1)
    norms = []
    # A clipped step, then a small one: Adam's first update is scale-invariant, its second is not.
    for scale in (3.0, 0.01):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * scale).to(dtype) if grad_fill is None else torch.full_like(p, grad_fill)
        norms.append(clip_and_step(opt, 1e-2, clip))
    return [p.detach().clone() for p in params], opt, norms[0]


def test_fused_step_folds_clipping_and_skips_non_finite():
    """The fused AdamW path hands clipping and the non-finite skip to the kernel (grad_scale /
    found_inf); it must update exactly like the explicit clip-then-step path, and skip like it."""
    plain, _, plain_norm = _step_with(False, None, clip=1.0)
    fused, _, fused_norm = _step_with(True, None, clip=1.0)
    assert plain_norm == fused_norm > 1.0  # clipping is active
    unclipped, _, _ = _step_with(False, None, clip=0.0)
    for a, b, c in zip(plain, fused, unclipped):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a, c)  # and it mattered
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    after, opt, norm = _step_with(True, float("nan"), clip=1.0)
    assert norm != norm  # NaN reported
    assert all(torch.equal(a, s) for a, s in zip(after, start))  # no update
    assert all(opt.state[p]["step"].item() == 0 for p in opt.param_groups[0]["params"])  # nor a step counted


def test_fused_step_with_bf16_parameters():
    """Pure bf16 parameters (no fp32 master copy): the grad norm is bf16, the kernel's grad_scale
    must be float32; the update is the explicit path's up to bf16 rounding."""
    plain, _, plain_norm = _step_with(False, None, clip=1.0, dtype=torch.bfloat16)
    fused, _, fused_norm = _step_with(True, None, clip=1.0, dtype=torch.bfloat16)
    assert plain_norm == fused_norm > 1.0
    for a, b in zip(plain, fused):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b, a, rtol=1.6e-2, atol=1e-2)


@pytest.mark.faults
@pytest.mark.distributed
def test_zero_skips_a_step_whose_gradient_is_non_finite_on_one_rank(tmp_path, austen_data):
    """ZeRO-1/2 in bf16 judge a step from the all-reduced gradient norm alone (deepspeed.py drops
    DeepSpeed's per-gradient scan): an infinite gradient element on rank 1, under a finite loss, skips
    the update on both ranks, and the next step updates again."""
    overrides = tiny_overrides(tmp_path / "run", austen_data, **{"train.engine": "deepspeed", "train.device": "cpu",
                                                                 "train.precision": "bf16", "train.global_batch_tokens": 1024})
    (tmp_path / "overrides.json").write_text(json.dumps(overrides))
    out = tmp_path / "out.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    run_processes([torchrun + ["tests/nonfinite_worker.py", str(out), str(tmp_path / "overrides.json")]], timeout=300)
    for rank in (0, 1):
        for stage, got in json.loads(Path(f"{out}.rank{rank}").read_text()).items():
            finite = [n == n and abs(n) != float("inf") for n in got["norms"]]
            assert finite == [True, False, True] and got["changed"] == [True, False, True], (rank, stage, got)


@pytest.mark.faults
def test_fsdp2_async_checkpoints_hold_the_state_of_their_own_step(tmp_path):
    """FSDP2's async saves copy the state into host buffers that the next save reuses (pinned, from a
    GPU): each checkpoint must hold the weights and optimizer state of its own step, not the previous
    checkpoint's or later ones'."""
    from cptrain.trainer.engines import build_engine
    from cptrain.trainer.engines.layout import init_distributed
    from cptrain.trainer.engines.spec import engine_spec
    from cptrain.trainer.loss import lm_loss

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(None, ["--model.preset=tiny", "--model.vocab_size=512", "--model.max_seq_len=64", "--data.seq_len=64",
                             "--train.micro_batch_size=4", "--train.global_batch_tokens=256", "--train.engine=fsdp2",
                             "--checkpoint.async=true", f"--train.device={dev.type}", f"--run_dir={tmp_path}"])
    ctx = init_distributed(dev.type)

    def engine():
        return build_engine(engine_spec(cfg, ctx), cfg.model.arch)

    def state(eng):
        return {k: v.detach().float().cpu().clone() for k, v in eng.optimizer.state_dict()["state"][0].items()
                if torch.is_tensor(v)} | {"w": next(eng.model.parameters()).detach().float().cpu().clone()}

    tokens = torch.randint(0, 512, (4, 65), device=dev)

    def train_step(eng, lr: float) -> None:
        eng.forward_backward({"tokens": tokens}, lambda m, b: lm_loss(m, b, 1 / 256), sync=True)
        eng.step(lr)

    eng = engine()
    saver = ckpt.Checkpointer(tmp_path, keep_last=3, async_save=True, device=dev)
    saved = {}
    for step in range(1, 4):
        train_step(eng, 1e-3)
        saved[step] = state(eng)
        saver.save(step, eng, [], {"progress": {}}, {})
        train_step(eng, 1e-3)  # changes the weights while the checkpoint is written
        saver.wait()
    for step in (2, 3):
        fresh = engine()
        train_step(fresh, 0.0)  # creates the optimizer state the checkpoint fills
        fresh.load(tmp_path / "checkpoints" / f"step-{step:08d}", optimizer=True)
        got = state(fresh)
        assert all(torch.equal(got[k], saved[step][k]) for k in saved[step]), step
