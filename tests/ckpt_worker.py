"""One rank of tests/test_run_safety.py's two-rank resume pick: `python -m tests.ckpt_worker RUN OUT`
with the usual RANK/WORLD_SIZE/MASTER_* environment. Writes OUT/rank<r>.json: the checkpoint it
picked, what it skipped, which manifest files it hashed, and whose decision on_rank0 returned."""
import json
import sys
from pathlib import Path

import torch.distributed as dist

from cptrain.trainer import checkpoint as ckpt
from cptrain.trainer import collectives as cc


def main(run_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    skipped: list[str] = []
    picked = ckpt.find_resume(Path(run_dir), log=skipped.append)
    entries = json.loads((ckpt.list_checkpoints(Path(run_dir) / "checkpoints")[0] / ckpt.MANIFEST).read_text())["files"]
    report = {"picked": str(picked), "skipped": skipped, "decided": cc.on_rank0(lambda: dist.get_rank()),
              "share": ckpt._share(entries, cc.world_size(), cc.rank())}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
