"""The engines behind the loop's Engine interface (base.py): local/DDP, DeepSpeed ZeRO, FSDP2."""
from __future__ import annotations


def build_engine(spec, arch, initial_state: dict | None = None, seed: int = 0):
    """The engine `spec.engine` names, around a Decoder of shape `arch` built on the meta device after
    seeding the RNG with `seed` (the same initial weights on every rank and in every engine; the
    engine shards first, then materializes). DeepSpeed and FSDP2 are imported only when chosen: each
    pulls in a large library. DeepSpeed empties `initial_state` once its weights are in place
    (deepspeed.py says why)."""
    import torch

    from ...model.decoder import Decoder

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Decoder(arch)
    if spec.engine == "deepspeed":
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, spec, initial_state)
    if spec.engine == "fsdp2":
        from .fsdp import FSDPEngine

        return FSDPEngine(model, spec, initial_state)
    from .local import LocalEngine

    return LocalEngine(model, spec, initial_state)
