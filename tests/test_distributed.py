"""DeepSpeed ZeRO and FSDP2 on 2 CPU ranks (gloo), started by the real launchers, against the
single-process run: same losses, two simulated nodes, checkpoints resumed at another world size,
and an exported HF folder that transformers loads.

One run of each engine is compared with one LocalEngine reference run (8 steps, checkpoints every
4). The launches are chained, so that each is spent on several checks:
  1. deepspeed, 2 ranks: ZeRO-0, -1 (fused loss), -2, -3 (partitioned from the start), all with
     checkpoints but ZeRO-0; the offload paths (ZeRO-2 optimizer offload with the fused loss, ZeRO-3
     parameter + optimizer offload, FSDP2 CPUOffloadPolicy with the fused loss and async checkpoints);
     DDP with the fused loss; bf16 ZeRO-3 and FSDP2 with activation checkpointing
     Muon under DDP and FSDP2 (against a one-process Muon run)
  2. deepspeed --no_ssh as two nodes (two `cptrain launch --node-rank` calls): FSDP2 (checkpoints)
  3. one process: resume ZeRO-1, -2, -3, FSDP2 and FSDP2 with Muon from step 4 (2 -> 1 ranks), checkpointing step 6
  4. torchrun, 2 ranks: resume them from step 6 (1 -> 2 ranks); the shipped GPU configs on a tiny shape
Every run keeps an EMA of the weights (train.ema_decay) and interpolates its weights every 3 steps
(meta-experience replay, continual.mer), so each engine's EMA and MER, resumed across world sizes,
are compared with the one-process run's too.
Measured in fp32: every engine, and every resumed run, matches the reference losses to ~2e-8
relative (float rounding of reductions in another order); the tests allow 1e-6.
"""
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from cptrain.errors import UserError
from cptrain.launch.launchers import deepspeed_command, slurm_script, torchrun_command
from cptrain.trainer import checkpoint as ckpt
from tests.conftest import tiny_overrides
from tests.multiproc import free_port, run_processes

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("dist_worker.py")
STEPS, TOKENS_PER_STEP = 8, 2048
RTOL = 1e-6  # measured: at most ~2e-8 relative (float rounding of reductions in another order)
FUSED = {"train.loss_chunk_tokens": 256}  # the fused chunked cross-entropy: 4 chunks of a micro-batch's 1024 tokens
OFFLOAD = {
    "zero2_offload": {"train.engine": "deepspeed", "deepspeed.zero_stage": 2, "deepspeed.offload_optimizer": True, **FUSED},
    "zero3_offload": {"train.engine": "deepspeed", "deepspeed.zero_stage": 3, "deepspeed.offload_params": True,
                      "deepspeed.offload_optimizer": True},
    "fsdp2_offload": {"train.engine": "fsdp2", "fsdp.cpu_offload": True, "checkpoint.async": True, **FUSED},
}
MUON = {"optim.name": "muon"}
ENGINES = {"zero1": {"train.engine": "deepspeed", "deepspeed.zero_stage": 1, **FUSED},
           "zero2": {"train.engine": "deepspeed", "deepspeed.zero_stage": 2},
           "zero3": {"train.engine": "deepspeed", "deepspeed.zero_stage": 3},
           "fsdp2": {"train.engine": "fsdp2"},
           "fsdp2_muon": {"train.engine": "fsdp2", **MUON}}
RESUMED = tuple(ENGINES)
GPU_CONFIGS = ("gpu_350m", "gpu_1.3b", "gpu_1b")


def _overrides(run_dir: Path, data: Path, **extra) -> list[str]:
    base = {"train.max_tokens": STEPS * TOKENS_PER_STEP, "train.global_batch_tokens": TOKENS_PER_STEP,
            "train.precision": "fp32", "train.device": "cpu", "eval.at_start": False,
            "checkpoint.interval_tokens": 4 * TOKENS_PER_STEP, "train.ema_decay": 0.9,
            "continual.mer.interval": 3, "continual.mer.strength": 0.5}
    return tiny_overrides(run_dir, data, **{**base, **extra})


def _launch(cmds: list[list[str]], timeout: float = 400, env: dict | None = None) -> str:
    """Launcher commands side by side, one per simulated node."""
    return "\n".join(run_processes(cmds, [env or {}] * len(cmds), timeout))


def _jobs(path: Path, jobs: list[dict]) -> str:
    path.write_text(json.dumps(jobs))
    return str(path)


def _launch_args(**kw) -> Namespace:
    base = dict(nodes=1, gpus_per_node=2, hostfile=None, master_addr=None, master_port=free_port(), no_ssh=False,
                node_rank=None, slurm_backend="torchrun", slurm_warning=120, resume=False)
    return Namespace(**{**base, **kw})


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _rewind(run_dir: Path, step: int) -> None:
    """Pretend the run stopped after checkpoint `step`: drop the later checkpoints."""
    import shutil

    ckpts = run_dir / "checkpoints"
    for c in ckpts.glob("step-*"):
        if int(c.name.split("-")[1]) > step:
            shutil.rmtree(c)
    (ckpts / "latest").write_text(f"step-{step:08d}\n")


def _assert_close(got: dict, want: dict, rtol: float, steps) -> None:
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=rtol), (s, got, want)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, austen_data):
    """All launches, chained; each test below checks a part of what they produced."""
    from cptrain.trainer.config import load_config
    from cptrain.trainer.loop import run

    root = tmp_path_factory.mktemp("dist")
    d = {name: root / name for name in ("local", "zero0", "zero1", "zero2", "zero3", "fsdp2", "zero3_bf16", "fsdp2_bf16",
                                        *OFFLOAD, "ddp_fused", "local_muon", "ddp_muon", "fsdp2_muon", *GPU_CONFIGS)}
    run(load_config(None, _overrides(d["local"], austen_data)))
    run(load_config(None, _overrides(d["local_muon"], austen_data, **MUON)))
    logs = {}

    ds = lambda stage, **kw: _overrides(d[f"zero{stage}"], austen_data, **{"train.engine": "deepspeed",  # noqa: E731
                                                                              "deepspeed.zero_stage": stage, **kw})
    no_ckpt = {"checkpoint.interval_tokens": 0, "checkpoint.at_end": False}
    # bf16 with activation checkpointing: 2 steps, to show that those paths train.
    bf16 = {"train.precision": "bf16", "train.activation_checkpointing": True, "train.max_tokens": 2 * TOKENS_PER_STEP, **no_ckpt}
    jobs = [{"overrides": ds(0, **no_ckpt)}, {"overrides": ds(1, **FUSED)}, {"overrides": ds(2)},
            {"overrides": _overrides(d["ddp_muon"], austen_data, **MUON)},
            {"overrides": _overrides(d["fsdp2_muon"], austen_data, **ENGINES["fsdp2_muon"])},
            # Persistence 0: even the tiny model's norms are partitioned (the default keeps them whole).
            {"overrides": ds(3, **{"deepspeed.extra": "{zero_optimization: {stage3_param_persistence_threshold: 0}}"})},
            {"overrides": _overrides(d["zero3_bf16"], austen_data, **{"train.engine": "deepspeed", "deepspeed.zero_stage": 3},
                                     **bf16)},
            {"overrides": _overrides(d["fsdp2_bf16"], austen_data, **{"train.engine": "fsdp2"}, **bf16)},
            *({"overrides": _overrides(d[name], austen_data, **extra)} for name, extra in OFFLOAD.items()),
            {"overrides": _overrides(d["ddp_fused"], austen_data, **FUSED, **{"checkpoint.async": True})}]
    args = _launch_args()
    logs["deepspeed"] = _launch([deepspeed_command(args, [str(WORKER), _jobs(root / "a.json", jobs)], root)])
    logs["deepspeed_port"] = args.master_port

    # Two nodes on one machine: `cptrain launch --launcher deepspeed --no-ssh --node-rank {0,1}`. The two
    # "nodes" share this machine's /dev/shm, so streaming is told they are one node (LOCAL_WORLD_SIZE=2).
    node = [sys.executable, "-m", "cptrain.launch.cli", "launch", "--launcher", "deepspeed", "--nodes", "2", "--gpus-per-node", "1",
            "--no-ssh", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    cfg = _overrides(d["fsdp2"], austen_data, **{"train.engine": "fsdp2"})
    (root / "empty.yaml").write_text("{}\n")
    logs["two_nodes"] = _launch([node + ["--node-rank", str(r), str(root / "empty.yaml"), *cfg] for r in (0, 1)],
                                env={"LOCAL_WORLD_SIZE": "2"})

    for engine in RESUMED:
        _rewind(d[engine], 4)
    every2 = {"checkpoint.interval_tokens": 2 * TOKENS_PER_STEP}
    resume = [{"overrides": _overrides(d[name], austen_data, **extra, **every2), "resume": True} for name, extra in ENGINES.items()]
    logs["to_1"] = _launch([[sys.executable, str(WORKER), _jobs(root / "b.json", resume)]])
    losses_1 = {k: _losses(d[k]) for k in RESUMED}

    for engine in RESUMED:
        _rewind(d[engine], 6)
    # The shipped GPU configs, unchanged but for the shape, the data and the device; compile off (the
    # inductor's CPU compile of each block would dominate the test; tests/test_model.py compiles).
    small = {"train.max_tokens": 2 * TOKENS_PER_STEP, "train.global_batch_tokens": TOKENS_PER_STEP, "train.micro_batch_size": 16,
             "train.device": "cpu", "train.compile": False, "eval.max_samples": 8}
    gpu = [{"overrides": tiny_overrides(d[name], austen_data, **small), "config": str(REPO / "trainer" / "configs" / f"{name}.yaml")}
           for name in GPU_CONFIGS]
    logs["to_2"] = _launch([torchrun_command(_launch_args(), [str(WORKER), _jobs(root / "c.json", resume + gpu)], root)])
    return d, logs, losses_1


def test_zero_stages_match_single_process(runs):
    d, logs, _ = runs
    want = _losses(d["local"])
    for stage in (0, 1, 2, 3):
        _assert_close(_losses(d[f"zero{stage}"]), want, RTOL, range(1, STEPS + 1))
    ds = json.loads((d["zero2"] / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert ds["world_size"] == 2
    leftovers = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{logs['deepspeed_port']}_*"))
    assert not leftovers, "DeepSpeed's shared-memory comm op was not disabled"


def test_bf16_with_activation_checkpointing_trains(runs):
    """bf16 weights (ZeRO-3) or bf16 compute over fp32 shards (FSDP2): the first loss is the fp32 one
    up to bf16 rounding, and the second step has learned."""
    d, _, _ = runs
    want = _losses(d["local"])
    for name in ("zero3_bf16", "fsdp2_bf16"):
        got = _losses(d[name])
        assert got[1] == pytest.approx(want[1], rel=1e-3) and got[2] < got[1], (name, got)


def test_fsdp2_on_two_simulated_nodes_matches_and_checkpoints(runs):
    d, logs, _ = runs
    for r in (0, 1):  # each node printed the deepspeed command it ran
        assert f"--no_ssh --node_rank {r} --no_local_rank --module cptrain.launch.cli train" in logs["two_nodes"]
    _assert_close(_losses(d["fsdp2"]), _losses(d["local"]), RTOL, range(1, STEPS + 1))
    state = json.loads((d["fsdp2"] / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["engine"] == "fsdp2"


def test_offload_and_fused_loss_paths_match_single_process(runs):
    """Every offload option and the fused loss under DDP, ZeRO and FSDP2 train like one process; the
    async checkpoints of two of them are complete."""
    d, _, _ = runs
    want = _losses(d["local"])
    for name in (*OFFLOAD, "ddp_fused"):
        _assert_close(_losses(d[name]), want, RTOL, range(1, STEPS + 1))
    for name in ("fsdp2_offload", "ddp_fused"):
        root = d[name] / "checkpoints"
        assert [c.name for c in ckpt.list_checkpoints(root)] == ["step-00000008", "step-00000004"]
        assert all(ckpt.verify(c) is None for c in ckpt.list_checkpoints(root))


def test_shipped_gpu_configs_run_on_two_ranks(runs):
    d, _, _ = runs
    for name in GPU_CONFIGS:
        rows = _losses(d[name])
        assert sorted(rows) == [1, 2] and rows[2] < rows[1], (name, rows)


def _ema(run_dir: Path, step: int = STEPS) -> dict:
    from cptrain.trainer.averaging import ema_weights

    return ema_weights(run_dir / "checkpoints" / f"step-{step:08d}")[1]


def test_muon_under_ddp_and_fsdp2_matches_single_process(runs):
    """Muon's sharded path (all-gather each matrix, orthogonalize, keep the own rows) is the one-process
    update; measured to ~1e-7 relative over 8 steps (Newton-Schulz amplifies rounding a little)."""
    d, _, _ = runs
    want = _losses(d["local_muon"])
    assert want[STEPS] < want[1]
    for name in ("ddp_muon", "fsdp2_muon"):
        _assert_close(_losses(d[name]), want, 1e-5, range(1, STEPS + 1))


@pytest.mark.resume
def test_the_weight_ema_matches_single_process_under_every_engine(runs):
    """The EMA each engine keeps on its own copies (replicated, ZeRO partitions, FSDP2 shards, offloaded),
    saved per rank and resumed 2 -> 1 -> 2 ranks for the resumed engines, is the one-process EMA up to
    the rounding of the weights themselves: measured at most 3.3e-5 of a tensor's largest value (the
    fused-loss runs; 2.5e-6 for the others), where an EMA restarted at the resume or left at the
    weights is off by 3e-3 or more."""
    d, _, _ = runs
    for ref, names in (("local", ("zero1", "zero2", "zero3", "fsdp2", *OFFLOAD, "ddp_fused")), ("local_muon", ("fsdp2_muon",))):
        want = _ema(d[ref])
        for name in names:
            got = _ema(d[name])
            assert got.keys() == want.keys(), name
            for k in want:
                assert (got[k] - want[k]).abs().max() <= 1e-4 * want[k].abs().max(), (name, k)


@pytest.mark.resume
def test_resume_at_another_world_size_continues_the_run(runs):
    d, logs, losses_1 = runs
    for engine in RESUMED:
        want = _losses(d["local_muon" if "muon" in engine else "local"])
        assert f"resumed from {d[engine]}/checkpoints/step-00000004 at step 4" in logs["to_1"]
        _assert_close(losses_1[engine], want, RTOL, range(5, STEPS + 1))  # 2 ranks -> 1
        assert f"resumed from {d[engine]}/checkpoints/step-00000006 at step 6" in logs["to_2"]
        _assert_close(_losses(d[engine]), want, RTOL, range(1, STEPS + 1))  # ... -> 2 ranks
    for engine in ("zero1", "zero2", "zero3"):  # the universal conversion is temporary, in the run's own directory
        assert not list(d[engine].rglob("*universal*")), engine


@pytest.mark.hf
def test_exported_hf_folders_load_in_transformers(runs, tmp_path):
    """Every engine's final checkpoint exports to an HF folder whose logits match the local run's."""
    from transformers import AutoModelForCausalLM

    from cptrain.launch.cli import main

    d, _, _ = runs
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name in ("local", "zero2", "zero3", "fsdp2"):
        assert main(["convert", "cptrain-to-hf", str(d[name]), str(tmp_path / name)]) == 0
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            logits[name] = model(tokens).logits
    for name in ("zero2", "zero3", "fsdp2"):
        torch.testing.assert_close(logits[name], logits["local"], rtol=1e-3, atol=1e-3)


def test_launcher_commands(tmp_path):
    """The commands and batch script that multi-node runs use (the local forms run above)."""
    entry = ["-m", "cptrain.launch.cli", "train", "c.yaml"]
    args = _launch_args(nodes=2, gpus_per_node=8, no_ssh=True, node_rank=1, master_addr="10.0.0.1", master_port=29500)
    cmd = deepspeed_command(args, entry, tmp_path)
    assert cmd[1:] == ["--hostfile", str(tmp_path / "hostfile"), "--num_nodes", "2", "--num_gpus", "8", "--master_port",
                       "29500", "--master_addr", "10.0.0.1", "--no_ssh", "--node_rank", "1", "--no_local_rank",
                       "--module", "cptrain.launch.cli", "train", "c.yaml"]
    assert (tmp_path / "hostfile").read_text() == "node0 slots=8\nnode1 slots=8\n"
    rdzv = torchrun_command(_launch_args(nodes=4, gpus_per_node=8, master_addr="h0", master_port=29500), entry, tmp_path)
    assert rdzv[1:9] == ["--nnodes", "4", "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint", "h0:29500"]
    script = slurm_script(_launch_args(nodes=2, gpus_per_node=8), "c.yaml", ["--train.engine=fsdp2"], tmp_path)
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "--node_rank $SLURM_NODEID",
                 "train c.yaml --resume --train.engine=fsdp2", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script
    (tmp_path / "job.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)


@pytest.mark.faults
def test_bad_launch_and_engine_options_are_refused(tmp_path, capsys):
    from cptrain.launch.cli import main
    from cptrain.trainer.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {engine: deepspeed}\n")
    assert main(["launch", "--launcher", "deepspeed", "--nodes", "2", "--no-ssh", "--dry-run", str(cfg)]) == 2
    assert "--no-ssh starts one node per invocation" in capsys.readouterr().err
    with pytest.raises(UserError, match="offload_params needs deepspeed.zero_stage=3"):
        load_config(None, ["--deepspeed.zero_stage=2", "--deepspeed.offload_params=true"])
    with pytest.raises(UserError, match="deepspeed.zero_stage must be one of"):
        load_config(None, ["--deepspeed.zero_stage=4"])


def test_deepspeed_bf16_accumulates_gradients_in_fp32(tmp_path, austen_data):
    """bf16 under ZeRO-1/2/3: fp32 gradient accumulation (DeepSpeed's own default would be bf16), a step
    that trains; ZeRO-0 in bf16 (bf16 weights, no master copy) is refused at load."""
    code = f"""
import json, sys, torch
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import Trainer
out = {{}}
for stage in (1, 2, 3):
    cfg = load_config(None, {tiny_overrides(tmp_path / "run", austen_data, **{"train.max_tokens": 2048, "train.micro_batch_size": 4,
                                                                              "train.precision": "bf16", "train.engine": "deepspeed",
                                                                              "eval.at_start": False, "checkpoint.at_end": False})!r}
                      + [f"--deepspeed.zero_stage={{stage}}", f"--run_dir={tmp_path}/run{{stage}}"])
    t = Trainer(cfg)
    rows = t.train()
    out[stage] = [str(d) for d in t.engine.model.get_data_types()] + [type(t.engine.model.optimizer).__name__, rows[-1]["loss"]]
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for stage, (model_dtype, accum_dtype, optimizer, loss) in got.items():
        assert (model_dtype, accum_dtype) == ("torch.bfloat16", "torch.float32"), stage
        assert loss == loss and loss > 0
    assert got["1"][2] == "BF16_Optimizer"  # DeepSpeed's fp32-accumulating path for ZeRO-1 in bf16
    from cptrain.trainer.config import load_config
    with pytest.raises(UserError, match="deepspeed.zero_stage=0 in bf16 trains bf16 weights"):
        load_config(None, tiny_overrides(tmp_path, austen_data, **{"train.engine": "deepspeed", "deepspeed.zero_stage": 0,
                                                                    "train.precision": "bf16"}))


@pytest.mark.slow
def test_engine_benchmark_runs_on_cpu(tmp_path):
    """bench/bench_engines.py end to end with the tiny preset: a DeepSpeed and the FSDP2 engine at 1 and 2
    processes (the engines themselves are tested above)."""
    out = _launch([[sys.executable, "bench/bench_engines.py", "--preset", "tiny", "--seq-len", "64", "--micro-batch", "2",
                    "--steps", "2", "--warmup", "1", "--gpus", "1,2", "--engines", "zero2,fsdp2"]], env={"OUT": str(tmp_path)})
    rows = json.loads((tmp_path / "bench_engines.json").read_text())
    assert {(r["engine"], r["gpus"]) for r in rows} == {(e, g) for e in ("zero2", "fsdp2") for g in (1, 2)}
    assert all(r["tokens_per_s_per_gpu"] > 0 and r["scaling_efficiency"] > 0 for r in rows)
    assert "| engine | GPUs | tokens/s per GPU |" in out
