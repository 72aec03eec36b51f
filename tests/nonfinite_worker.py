"""Under torchrun, 2 ranks: ZeRO-1 and ZeRO-2 in bf16 take a finite step, then a step whose loss is
finite but whose gradient holds one infinite element on rank 1 alone, then a finite step again.
`python tests/nonfinite_worker.py OUT.json OVERRIDES.json`; each rank writes OUT.json.rank<r>:
per stage, the three gradient norms and whether each step changed the fp32 master weights."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cptrain.trainer.config import load_config
from cptrain.trainer.engines import build_engine
from cptrain.trainer.engines.layout import init_distributed
from cptrain.trainer.engines.spec import engine_spec
from cptrain.trainer.loss import lm_loss


def infinite_element(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad.view(-1)[0] = float("inf")
    return grad


def main(out: str, overrides_file: str) -> None:
    ctx = init_distributed("cpu")
    overrides = json.loads(Path(overrides_file).read_text())
    result = {}
    for stage in (1, 2):
        cfg = load_config(None, overrides + [f"--deepspeed.zero_stage={stage}"])
        engine = build_engine(engine_spec(cfg, ctx), cfg.model.arch)
        gen = torch.Generator().manual_seed(ctx.rank)
        batch = {"tokens": torch.randint(0, cfg.model.arch.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1),
                                         generator=gen)}
        scale = ctx.world_size / cfg.train.global_batch_tokens
        # Whichever rank's partition holds the infinite element after the reduction, the other
        # rank's stays finite: only the all-reduced norm makes both skip.
        first = next(engine.module.parameters())
        norms, changed, before = [], [], engine.full_state_dict()
        for step in range(3):
            hook = first.register_hook(infinite_element) if step == 1 and ctx.rank == 1 else None
            engine.forward_backward(batch, lambda m, b: lm_loss(m, b, scale), sync=True)
            if hook is not None:
                hook.remove()
            norms.append(engine.step(1e-3))
            after = engine.full_state_dict()
            changed.append(any(not torch.equal(before[k], after[k]) for k in before))
            before = after
        result[f"zero{stage}"] = {"norms": norms, "changed": changed}
    Path(f"{out}.rank{ctx.rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
