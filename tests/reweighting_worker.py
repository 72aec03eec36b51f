"""One rank of tests/test_reweighting.py's two-rank run: `python -m tests.reweighting_worker OUT` with the
usual RANK/WORLD_SIZE/MASTER_* environment and the config overrides in OUT/args.json.

The first step's sample weights are computed through the real all-gather on the real (DDP) engine
and written to OUT/weights<rank>.pt with the samples they belong to; then the run trains."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.test_reweighting import first_step_weights
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import Trainer


def main(out: Path) -> None:
    cfg = load_config(None, json.loads((out / "args.json").read_text()))
    trainer = Trainer(cfg)
    torch.save(first_step_weights(trainer), out / f"weights{trainer.layout.rank}.pt")
    trainer.train()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
