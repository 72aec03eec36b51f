"""Two real ranks (gloo) read the training stream; a run stopped there resumes on one rank with
twice the micro-batch and sees exactly the samples an uninterrupted run sees.

Run as a module, this file is one rank: `python -m tests.test_data_distributed ROOT OUT` with the
usual RANK/WORLD_SIZE/MASTER_* environment."""
import json
import sys
from pathlib import Path

import pytest

from cptrain.data_pipeline.loader import DataConfig, DomainConfig, build_train_loader, build_val_loaders
from tests.multiproc import run_ranks

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
    loader = build_train_loader(config(root), micro_batch_size=2, rank=rank, world_size=world, seed=11)
    micro = [ids(next(loader)) for _ in range(STEPS * ACCUM)]
    val = [ids(b) for b in build_val_loaders(config(root), micro_batch_size=2, rank=rank, world_size=world,
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
    cfg = config(root)
    ref = build_train_loader(cfg, micro_batch_size=4, rank=0, world_size=1, seed=11)
    reference = [ids(next(ref)) for _ in range(2 * STEPS * ACCUM)]
    # Micro-batch j of the 2-rank run = rank 0's part + rank 1's part of global round j.
    joined = [a + b for a, b in zip(two[0]["micro"], two[1]["micro"])]
    assert joined == reference[:STEPS * ACCUM]

    resumed = build_train_loader(cfg, micro_batch_size=4, rank=0, world_size=1, seed=11, state=two[0]["state"])
    assert [ids(next(resumed)) for _ in range(STEPS * ACCUM)] == reference[STEPS * ACCUM:]

    one_val = [ids(b) for b in build_val_loaders(cfg, micro_batch_size=4, rank=0, world_size=1, max_samples=8)["en"]()]
    assert sorted(sum(two[0]["val"] + two[1]["val"], [])) == sorted(sum(one_val, []))


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]), Path(sys.argv[2]))
