"""Two real ranks (gloo) read the training stream; a run stopped there resumes on one rank with
twice the micro-batch and sees exactly the samples an uninterrupted run sees. Two 2-rank trainings
run side by side on one machine and one prepared directory, each as if alone.

Run as a module, this file is one rank: `python -m tests.test_data_distributed ROOT OUT` with the
usual RANK/WORLD_SIZE/MASTER_* environment."""
import json
import os
import sys
import threading
from pathlib import Path

import pytest

from cptrain.data_pipeline.config import DataConfig, DomainConfig, validate_data
from cptrain.data_pipeline.loader import build_train_loader, build_val_loaders
from tests.conftest import tiny_overrides
from tests.multiproc import rank_envs, run_processes, run_ranks

SEQ, STEPS, ACCUM = 32, 3, 2


def config(root: Path) -> DataConfig:
    return DataConfig(domains=[DomainConfig("en", str(root / "en"), 2.0), DomainConfig("es", str(root / "es"))],
                      seq_len=SEQ)


def ids(batch) -> list[list[int]]:
    return [[int(d), int(s)] for d, s in zip(batch["domain"], batch["sample_id"])]


def rank_main(root: Path, out: Path) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = validate_data(config(root), 800)
    loader = build_train_loader(data, micro_batch_size=2, rank=rank, world_size=world, seed=11)
    micro = [ids(next(loader)) for _ in range(STEPS * ACCUM)]
    val = [ids(b) for b in build_val_loaders(data, micro_batch_size=2, rank=rank, world_size=world,
                                             max_samples=8)["en"]()]
    (out / f"rank{rank}.json").write_text(json.dumps({"micro": micro, "state": loader.state_dict(), "val": val}))
    dist.barrier()
    dist.destroy_process_group()


def _run_ranks(root: Path, out: Path, world: int) -> list[dict]:
    run_ranks([sys.executable, "-m", "tests.test_data_distributed", str(root), str(out)], world, timeout=120)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.data
@pytest.mark.distributed
@pytest.mark.resume
def test_two_ranks_then_resume_on_one(tmp_path):
    from test_data_support import make_domains
    root = tmp_path / "data"
    make_domains(root, SEQ)
    two = _run_ranks(root, tmp_path, world=2)
    assert two[0]["state"] == two[1]["state"]  # the state is global: any rank's copy resumes the run

    # Uninterrupted reference: one rank, micro-batch 4 (= 2 x 2 ranks), same accumulation.
    data = validate_data(config(root), 800)
    ref = build_train_loader(data, micro_batch_size=4, rank=0, world_size=1, seed=11)
    reference = [ids(next(ref)) for _ in range(2 * STEPS * ACCUM)]
    # Micro-batch j of the 2-rank run = rank 0's part + rank 1's part of global round j.
    joined = [a + b for a, b in zip(two[0]["micro"], two[1]["micro"])]
    assert joined == reference[:STEPS * ACCUM]

    resumed = build_train_loader(data, micro_batch_size=4, rank=0, world_size=1, seed=11, state=two[0]["state"])
    assert [ids(next(resumed)) for _ in range(STEPS * ACCUM)] == reference[STEPS * ACCUM:]

    one_val = [ids(b) for b in build_val_loaders(data, micro_batch_size=4, rank=0, world_size=1, max_samples=8)["en"]()]
    assert sorted(sum(two[0]["val"] + two[1]["val"], [])) == sorted(sum(one_val, []))


def _train_side_by_side(root: Path, data: Path, jobs: dict[str, dict]) -> list[dict[int, float]]:
    """2-rank `cptrain train` jobs started together (3 steps of the tiny model); their losses by step."""
    (root / "empty.yaml").write_text("{}\n")
    train = [sys.executable, "-m", "cptrain.launch.cli", "train", str(root / "empty.yaml")]
    short = {"train.max_tokens": 3072, "eval.at_start": False, "train.device": "cpu"}
    cmds = [[*train, *tiny_overrides(root / name, data, **short, **extra)]
            for name, extra in jobs.items() for _rank in range(2)]
    run_processes(cmds, [env for _ in jobs for env in rank_envs(2)], timeout=120)
    rows = [[json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()] for name in jobs]
    return [{r["step"]: r["loss"] for r in job if "loss" in r} for job in rows]


class _ShmWatch(threading.Thread):
    """Collects the /dev/shm names held open or mapped by processes whose command line holds
    `marker`. A name unlinked while held is not collected: no other job can pick it, and it
    vanishes with its holders. Other jobs on the machine may use /dev/shm meanwhile, so a diff of
    its listing would not say whose an entry is."""

    def __init__(self, marker: str):
        super().__init__(daemon=True)
        self.marker, self.names, self.done = marker, set(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    if self.marker not in (proc / "cmdline").read_text():
                        continue
                    held = [line.split(None, 5)[-1] for line in (proc / "maps").read_text().splitlines()]
                    held += [os.readlink(fd) for fd in (proc / "fd").iterdir()]
                except OSError:  # the process ended meanwhile
                    continue
                self.names |= {p for p in held if p.startswith("/dev/shm/") and not p.endswith("(deleted)")}


@pytest.mark.data
@pytest.mark.distributed
def test_runs_side_by_side_share_nothing(tmp_path, austen_data):
    """Three times over, two 2-rank trainings (one with a DataLoader worker per rank) start at the
    same moment on the same prepared directory: both train exactly as a run alone does, and no
    process of theirs ever holds a /dev/shm name. Through StreamingDataset one job often died at
    start here, both having picked the same shared-memory name (FileExistsError: [Errno 17] File
    exists: '/000001_shard_states'), and its names outlived the runs."""
    watch = _ShmWatch(str(tmp_path))
    watch.start()
    [alone] = _train_side_by_side(tmp_path, austen_data, {"alone": {}})
    assert len(alone) == 3
    for i in range(3):
        both = _train_side_by_side(tmp_path, austen_data, {f"a{i}": {}, f"b{i}": {"data.num_workers": 1}})
        assert both == [alone, alone]
    watch.done.set()
    watch.join()
    assert watch.names == set()

if __name__ == "__main__":
    rank_main(Path(sys.argv[1]), Path(sys.argv[2]))
