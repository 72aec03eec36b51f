"""One rank of tests/test_sparsity.py's sharded runs: `python sparsity_worker.py OUT` with the usual
RANK/WORLD_SIZE/MASTER_* environment and the config overrides in OUT/args.json.

The trainer is built with the configured engine, the masks are selected on the initial weights
(identical on every engine) and written to OUT/masks/, then the run trains with them."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, when run as a script

import torch.distributed as dist  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.loop import Trainer  # noqa: E402


def main(out: Path) -> None:
    cfg = load_config(None, json.loads((out / "args.json").read_text()))
    trainer = Trainer(cfg)
    trainer.pruner.prune(cfg.sparsity.target)
    (out / "masks").mkdir(exist_ok=True)
    trainer.pruner.save(out / "masks", trainer.ctx.rank)
    trainer.train()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
