"""One rank of tests/test_sparsity.py's sharded runs: `python -m tests.sparsity_worker OUT` with the usual
RANK/WORLD_SIZE/MASTER_* environment and the config overrides in OUT/args.json.

The trainer is built with the configured engine, the masks are selected on the initial weights
(identical on every engine; rounded so that many tie at the threshold) and written to OUT/masks/, then the run trains with them and rank 0
writes the final full weights to OUT/final.pt."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cptrain.trainer.config import load_config
from cptrain.trainer.loop import Trainer
from cptrain.trainer.params import collect_targets
from cptrain.trainer.sparsity import Pruner


def quantize(targets) -> None:
    """Round the weights to multiples of 0.01 (init std 0.02): thousands of ties at any threshold, so
    the cross-rank tie-breaking decides which weights are pruned. Elementwise, so every sharding of
    a tensor rounds to the same values as the whole tensor."""
    with torch.no_grad():
        for t in targets:
            t.values.copy_(torch.round(t.values * 100) / 100)


def main(out: Path) -> None:
    cfg = load_config(None, json.loads((out / "args.json").read_text()))
    trainer = Trainer(cfg)
    pruner = next(a for a in trainer.addons if isinstance(a, Pruner))
    quantize(collect_targets(trainer.engine, cfg.sparsity.params)[0])
    pruner.prune(cfg.sparsity.target)
    (out / "masks").mkdir(exist_ok=True)
    pruner.save(out / "masks", trainer.layout.rank)
    trainer.train()
    weights = trainer.engine.full_state_dict()  # collective under FSDP2 and ZeRO-3
    if trainer.layout.is_main:
        torch.save(weights, out / "final.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
