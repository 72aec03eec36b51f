"""Long sequences on one device (trainer/engines/memory.py): checkpointed block inputs parked on the
host and the MLP computed in tiles along the sequence train exactly as plain activation checkpointing
does. Their memory and speed are measured on the GPU (bench/bench_long.py, docs/long_context.md)."""
import json

import pytest

from cptrain.errors import UserError
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import run
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.longctx
STEPS = {"train.max_tokens": 4096, "train.precision": "fp32", "eval.at_start": False, "checkpoint.at_end": False}


def _rows(tmp_path, data, name, **extra):
    run(load_config(None, tiny_overrides(tmp_path / name, data, **STEPS, **{"train.activation_checkpointing": True}, **extra)))
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if "loss" in line]


def test_offloaded_checkpoints_and_a_tiled_mlp_train_as_plain_checkpointing(tmp_path, austen_data):
    plain = _rows(tmp_path, austen_data, "plain")
    offloaded = _rows(tmp_path, austen_data, "offloaded", **{"train.offload_activations": True})
    tiled = _rows(tmp_path, austen_data, "tiled", **{"train.offload_activations": True, "train.mlp_tile_tokens": 16})
    for a, b, c in zip(plain, offloaded, tiled, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], "the same ops, recomputed the same way"
        # Tiles are matmuls over fewer rows: float32 rounding may differ in the last bits.
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-6) and c["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("extra, message", [
    ({"train.offload_activations": True}, "set train.activation_checkpointing=true"),
    ({"train.mlp_tile_tokens": -1}, "must be >= 0"),
])
def test_bad_memory_settings_fail_in_one_line(tmp_path, austen_data, extra, message):
    with pytest.raises(UserError, match=message):
        load_config(None, tiny_overrides(tmp_path, austen_data, **extra))


def test_offload_refuses_several_processes_before_building():
    import torch

    from cptrain.trainer.engines.layout import Layout
    from cptrain.trainer.engines.spec import engine_spec

    cfg = load_config(None, ["--train.activation_checkpointing=true", "--train.offload_activations=true",
                             "--model.max_seq_len=2048"])
    with pytest.raises(UserError, match="across GPUs split the sequence with parallel.cp"):
        engine_spec(cfg, Layout(0, 2, 0, torch.device("cpu")))


def test_checkpointing_inside_the_compiled_block_keeps_only_its_input_and_the_same_gradients():
    """trainer/engines/base.py checkpoint_in_forward: compiled, the recompute is part of the block's own
    backward graph. Autograd keeps a fraction of the plain block's activations, and every gradient is the
    plain model's."""
    import torch

    from cptrain.model.decoder import Decoder
    from cptrain.model.presets import preset
    from cptrain.trainer.engines.base import checkpoint_in_forward

    def grads_and_saved_bytes(wrap):
        torch.manual_seed(0)
        model = Decoder(preset("tiny"))
        model.init_weights()
        for block in model.layers:
            wrap(block)
            block.compile(backend="aot_eager")
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            loss = model(torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(1))).float().square().mean()
        loss.backward()
        return {k: p.grad for k, p in model.named_parameters()}, sum(saved)

    plain, plain_bytes = grads_and_saved_bytes(lambda block: None)
    checkpointed, bytes_ = grads_and_saved_bytes(checkpoint_in_forward)
    assert bytes_ < 0.4 * plain_bytes
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
