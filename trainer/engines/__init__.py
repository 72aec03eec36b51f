"""The engines behind the loop's Engine interface (base.py): local/DDP, DeepSpeed ZeRO, FSDP2."""
from __future__ import annotations


def build_engine(cfg, model, ctx, initial_state: dict | None):
    """The engine `train.engine` names, wrapping `model` (built on the meta device). DeepSpeed and
    FSDP2 are imported only when chosen: each pulls in a large library. DeepSpeed empties
    `initial_state` once its weights are in place (deepspeed.py says why)."""
    if cfg.train.engine == "deepspeed":
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, ctx, initial_state)
    if cfg.train.engine == "fsdp2":
        from .fsdp import FSDPEngine

        return FSDPEngine(model, cfg, ctx, initial_state)
    from .local import LocalEngine

    return LocalEngine(model, cfg, ctx, initial_state)
