"""Under torchrun: each rank's logits through context parallelism (its part of each row) against the
same rows' logits computed whole in this process, for both algorithms and three attention setups
(document masking; sliding windows with a custom scale; soft-capped scores). Weights are drawn with
a large spread so that a wrong position, mask or merge changes the logits visibly."""
import os
import sys

import torch
import torch.distributed as dist

from cptrain.model.config import ModelConfig
from cptrain.model.decoder import Decoder
from cptrain.trainer.engines.context import ContextParallel
from cptrain.trainer.engines.layout import ParallelSection, init_distributed

SHAPES = {
    "llama": ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=96, max_seq_len=128),
    "mistral": ModelConfig(family="mistral", vocab_size=97, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=96,
                           max_seq_len=128, sliding_window=20),
    "gemma2": ModelConfig(family="gemma2", vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                          max_seq_len=128, sliding_window=20, layer_types=["sliding", "full"], attn_scale_dim=24,
                          attn_softcap=5.0, final_softcap=30.0, norm_placement="sandwich", norm_unit_offset=True,
                          activation="gelu_tanh", embed_scale=True),
}


def main(method: str) -> None:
    layout = init_distributed("cpu", ParallelSection(cp=int(os.environ["WORLD_SIZE"]), cp_method=method))
    gen = torch.Generator().manual_seed(7)
    for name, arch in SHAPES.items():
        torch.manual_seed(0)
        model = Decoder(arch)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.ndim == 1 and not arch.norm_unit_offset else 0.0))
        tokens = torch.randint(0, arch.vocab_size, (2, 97), generator=gen)
        doc_ids = torch.cat([torch.zeros(2, 30, dtype=torch.int32), torch.ones(2, 40, dtype=torch.int32),
                             torch.full((2, 27), 2, dtype=torch.int32)], dim=1)
        doc_ids[1] = torch.clamp(doc_ids[1] * 2, max=3)
        whole = model(tokens[:, :-1], doc_ids[:, :-1])
        part = ContextParallel(layout, doc_masking=True).shard({"tokens": tokens, "doc_ids": doc_ids})
        local = model(part["inputs"], split=part["split"])
        # Ring attention sums its blocks in another order than one process does: float32 rounding,
        # grown by the large weights to ~1e-4 of logits of size ~10; a wrong position or mask moves them by ~1.
        torch.testing.assert_close(local, whole[:, part["split"].index], rtol=0, atol=1e-3, msg=f"{method} {name}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
