"""Pruning masks and sparse-then-dense training: exact counts, 2:4, the cubic schedule, zeros that
stay zero through training and resume, densification, and the same masks under 2-rank FSDP2 and
DeepSpeed ZeRO as in one process."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cptrain.errors import UserError
from tests.conftest import tiny_overrides
from tests.sparsity_worker import quantize
from cptrain.trainer.checkpoint import load_full_weights
from cptrain.trainer.config import load_config
from cptrain.trainer.engines import build_engine
from cptrain.trainer.engines.layout import Layout
from cptrain.trainer.engines.spec import engine_spec
from cptrain.trainer.engines.local import LocalEngine
from cptrain.trainer.loop import run
from tests.multiproc import run_ranks
from cptrain.trainer.params import collect_targets, read_pieces
from cptrain.trainer.sparsity import MASK_FILE, Pruner, SparsityConfig, prune_point, target_at

pytestmark = pytest.mark.sparsity
TARGETS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
           "feed_forward.w3")


def _cfg(tmp_path, data, **extra):
    return load_config(None, tiny_overrides(tmp_path / "run", data, **extra))


def _engine(cfg, weights: dict | None = None) -> LocalEngine:
    return build_engine(engine_spec(cfg, Layout()), cfg.model.arch, weights, seed=cfg.seed)  # as the trainer builds it


def _pruner(cfg, engine) -> Pruner:
    return Pruner(cfg.sparsity, cfg.train.max_tokens, sum(p.numel() for p in engine.module.parameters()), engine)


def _pruned_weights(state: dict) -> dict:
    return {k: v for k, v in state.items() if any(t in k for t in TARGETS)}


def _reference(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The k smallest |w| over the tensors in (magnitude, tensor order, flat index) order."""
    flat = torch.cat([t.reshape(-1).abs() for t in tensors])
    order = torch.sort(flat, stable=True).indices[:k]
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order] = True
    return list(chosen.split([t.numel() for t in tensors]))


def test_cubic_schedule():
    cfg = SparsityConfig(enabled=True, target=0.8, interval_tokens=100)
    assert target_at(cfg, 249, 1000) == 0.0
    assert target_at(cfg, 250, 1000) == 0.0
    assert target_at(cfg, 500, 1000) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert target_at(cfg, 375, 1000) == pytest.approx(0.8 * (1 - 0.75 ** 3))
    assert target_at(cfg, 750, 1000) == target_at(cfg, 1000, 1000) == 0.8
    # Points every 100 tokens from 250 to 750; a step crossing several prunes once, at the last.
    points = [prune_point(cfg, b, b + 64, 1000) for b in range(0, 1000, 64)]
    assert [p for p in points if p is not None] == [250, 350, 450, 550, 650, 750]
    assert prune_point(cfg, 200, 480, 1000) == 450
    one = SparsityConfig(enabled=True, schedule="oneshot", start_fraction=0.5)
    assert [prune_point(one, b, b + 64, 1000) for b in (384, 448, 512)] == [None, 500, None]
    assert target_at(one, 499, 1000) == 0.0 and target_at(one, 500, 1000) == 0.5


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_exact_counts_and_ties(tmp_path, austen_data, scope):
    cfg = _cfg(tmp_path, austen_data, **{"sparsity.enabled": True, "sparsity.scope": scope})
    engine = _engine(cfg)
    with torch.no_grad():  # few distinct magnitudes: thousands of ties at every threshold
        for p in engine.module.parameters():
            p.copy_(torch.randint(-4, 5, p.shape).float() * 0.01)
    pruner = _pruner(cfg, engine)
    pruner.prune(0.3)
    targets, _ = collect_targets(engine, cfg.sparsity.params)
    assert len(targets) == 7 * 2
    before = [t.values.clone() for t in targets]
    zeros = [int((t.values == 0).sum()) for t in targets]
    if scope == "layer":
        assert zeros == [round(0.3 * t.values.numel()) for t in targets]
    else:
        assert sum(zeros) == round(0.3 * sum(t.values.numel() for t in targets))
    assert pruner.state.pruned == sum(zeros)
    # Gradual: a higher target keeps every earlier zero and adds the next-smallest weights.
    old = {k: v.clone() for k, v in pruner.masks.items()}
    pruner.prune(0.6)
    for t in targets:
        assert bool((pruner.masks[t.name] | ~old[t.name]).all())
    groups = [[i] for i in range(len(targets))] if scope == "layer" else [list(range(len(targets)))]
    keys = [torch.where(old[t.name], torch.zeros(()), b.abs() + 1) for t, b in zip(targets, before)]
    for g in groups:
        k = round(0.6 * sum(targets[i].values.numel() for i in g))
        for i, want in zip(g, _reference([keys[i] for i in g], k)):
            assert torch.equal(pruner.masks[targets[i].name], want), targets[i].name


def test_2_4_pattern(tmp_path, austen_data):
    cfg = _cfg(tmp_path, austen_data, **{"sparsity.enabled": True, "sparsity.pattern": "2of4",
                                         "sparsity.schedule": "oneshot", "sparsity.params": "[attention, mlp, output]"})
    engine = _engine(cfg)
    dense = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    _pruner(cfg, engine).prune(0.5)
    for name, p in engine.module.named_parameters():
        if any(t in name for t in TARGETS + ("output",)):
            groups, orig = p.detach().view(-1, 4), dense[name].view(-1, 4).abs()
            assert bool(((groups == 0).sum(1) == 2).all()), name
            kept_min = orig.masked_fill(groups == 0, float("inf")).min(1).values
            dropped_max = orig.masked_fill(groups != 0, -1.0).max(1).values
            assert bool((dropped_max <= kept_min).all()), name
        else:
            assert torch.equal(p.detach(), dense[name]), f"{name} must stay dense"


def test_bad_config_is_refused(tmp_path, austen_data):
    with pytest.raises(UserError, match="sparsity.target"):
        _cfg(tmp_path, austen_data, **{"sparsity.target": 1.5})
    with pytest.raises(UserError, match="2of4"):
        _cfg(tmp_path, austen_data, **{"sparsity.pattern": "2of4"})
    with pytest.raises(UserError, match="densify_at_tokens"):
        _cfg(tmp_path, austen_data, **{"sparsity.enabled": True, "sparsity.densify_at_tokens": 4096})
    with pytest.raises(UserError, match="sparsity.params"):
        _cfg(tmp_path, austen_data, **{"sparsity.params": "[norms]"})


def _zero_fraction(state: dict) -> float:
    w = _pruned_weights(state)
    return sum(int((v == 0).sum()) for v in w.values()) / sum(v.numel() for v in w.values())


@pytest.mark.resume
def test_zeros_hold_through_training_and_resume(tmp_path, austen_data):
    cfg = _cfg(tmp_path, austen_data, **{"sparsity.enabled": True, "sparsity.target": 0.75, "sparsity.interval_tokens": 1024,
                                         "train.max_tokens": 12288, "checkpoint.interval_tokens": 6144})
    full = run(cfg)
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    mid, end = load_full_weights(ckpts / "step-00000006")[1], load_full_weights(ckpts / "step-00000012")[1]
    assert _zero_fraction(mid) == pytest.approx(0.75 * (1 - 0.5 ** 3), abs=1e-4)  # halfway up the cubic ramp
    assert _zero_fraction(end) == pytest.approx(0.75, abs=1e-4)
    # Every weight pruned by step 6 is still exactly zero 6 steps later, and untouched tensors are dense.
    for k, v in _pruned_weights(mid).items():
        assert bool((end[k][v == 0] == 0).all()), k
    assert int((end["tok_embeddings.weight"] == 0).sum()) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    info = json.loads((run_dir / "run_info.json").read_text())
    nonzero = [r["nonzero_params"] for r in rows if "nonzero_params" in r]
    assert nonzero[0] == info["params"] and nonzero[-1] < nonzero[0] and nonzero == sorted(nonzero, reverse=True)
    # Equal tokens per step: the average over tokens is the mean over steps of the count each step
    # trained with (the previous step's count; a step's pruning acts from the next step on).
    assert len(nonzero) == 12 and info["avg_nonzero_params"] == pytest.approx((info["params"] + sum(nonzero[:-1])) / 12)
    assert rows[-1]["avg_params"] == pytest.approx(info["avg_nonzero_params"]) and info["flops"] == "dense"
    # Resume from step 6: the same losses, bit for bit, and the same final weights.
    shutil.rmtree(ckpts / "step-00000012")
    (ckpts / "latest").write_text("step-00000006\n")
    resumed = run(cfg, resume=True)
    assert [(r["step"], r["loss"]) for r in resumed if "loss" in r] == [(r["step"], r["loss"]) for r in full if r["step"] > 6]
    again = load_full_weights(ckpts / "step-00000012")[1]
    assert all(torch.equal(again[k], end[k]) for k in end)
    assert json.loads((run_dir / "run_info.json").read_text())["avg_nonzero_params"] == info["avg_nonzero_params"]


def test_densify_lets_pruned_weights_learn(tmp_path, austen_data):
    cfg = _cfg(tmp_path, austen_data, **{"sparsity.enabled": True, "sparsity.schedule": "oneshot",
                                         "sparsity.start_fraction": 0.25, "sparsity.densify_at_tokens": 5120,
                                         "train.max_tokens": 8192, "checkpoint.interval_tokens": 5120})
    rows = run(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    at, end = (_pruned_weights(load_full_weights(ckpts / n)[1]) for n in ("step-00000005", "step-00000008"))
    assert _zero_fraction(at) == pytest.approx(0.5, abs=1e-4)
    revived = sum(int(((at[k] == 0) & (end[k] != 0)).sum()) for k in at)
    assert revived > 0.99 * sum(int((v == 0).sum()) for v in at.values())
    assert not list((ckpts / "step-00000008").glob(MASK_FILE.format(rank="*")))
    by_step = {r["step"]: r for r in rows if "nonzero_params" in r}
    total, sparse = by_step[1]["nonzero_params"], by_step[2]["nonzero_params"]
    assert sparse < total and by_step[4]["nonzero_params"] == sparse and by_step[5]["nonzero_params"] == total
    assert by_step[8]["sparsity"] == 0.0
    assert by_step[8]["avg_params"] == pytest.approx((5 * total + 3 * sparse) / 8)  # steps 3-5 trained sparse


def test_continual_pretraining_from_sparse_checkpoint(tmp_path, austen_data):
    sparse = _cfg(tmp_path, austen_data, **{"sparsity.enabled": True, "sparsity.schedule": "oneshot",
                                            "sparsity.start_fraction": 0.5, "train.max_tokens": 8192})
    run(sparse)
    src = tmp_path / "run"
    before = _pruned_weights(load_full_weights(src)[1])
    for enabled in (True, False):  # kept while enabled; dropped (dense) when not
        cfg = load_config(None, tiny_overrides(tmp_path / f"cont-{enabled}", austen_data, **{
            "model.init_from": str(src), "model.load": "weights+optimizer", "sparsity.enabled": enabled,
            "sparsity.schedule": "oneshot", "sparsity.start_fraction": 1.0, "train.max_tokens": 4096}))
        rows = run(cfg)
        after = _pruned_weights(load_full_weights(tmp_path / f"cont-{enabled}")[1])
        still_zero = sum(int((after[k][v == 0] == 0).sum()) for k, v in before.items())
        was_zero = sum(int((v == 0).sum()) for v in before.values())
        assert (still_zero == was_zero) if enabled else (still_zero < 0.01 * was_zero)
        assert (rows[-1]["sparsity"] > 0.2) if enabled else (rows[-1]["sparsity"] == 0.0)


# ---------------------------------------------------------------- two ranks, real engines over gloo

def _launch(overrides: list[str], out: Path, world: int = 2) -> None:
    (out / "args.json").write_text(json.dumps(overrides))
    run_ranks([sys.executable, "-m", "tests.sparsity_worker", str(out)], world)


def _val_loss(cfg, weights: dict) -> float:
    from cptrain.data_pipeline.config import validate_data
    from cptrain.data_pipeline.loader import build_val_loaders
    from cptrain.trainer.loop import evaluate

    engine = _engine(cfg, weights)
    loaders = build_val_loaders(validate_data(cfg.data, cfg.model.arch.vocab_size),
                                micro_batch_size=cfg.train.micro_batch_size, rank=0, world_size=1,
                                max_samples=cfg.eval.max_samples)
    return evaluate(engine, loaders, cfg.train.loss_chunk_tokens)["val/austen"]


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["fsdp2", "zero3", "zero2"])
def test_sharded_masks_match_one_process(tmp_path, austen_data, engine):
    extra = {"sparsity.enabled": True, "sparsity.scope": "global", "sparsity.target": 0.6, "sparsity.schedule": "oneshot",
             "sparsity.start_fraction": 0.0, "train.max_tokens": 4096, "eval.max_samples": 8}
    if engine == "fsdp2":
        extra["train.engine"] = "fsdp2"
    else:
        extra.update({"train.engine": "deepspeed", "deepspeed.zero_stage": int(engine[-1])})
    out = tmp_path / "out"
    out.mkdir()
    overrides = tiny_overrides(tmp_path / "run", austen_data, **extra)
    _launch(overrides, out)
    # One process, the same initial weights, the same call.
    local = load_config(None, tiny_overrides(tmp_path / "local", austen_data, **{**extra, "train.engine": "local"}))
    ref_engine = _engine(local)
    targets, _ = collect_targets(ref_engine, local.sparsity.params)
    quantize(targets)
    magnitudes = [t.values.abs().clone() for t in targets]
    ref = _pruner(local, ref_engine)
    ref.prune(0.6)
    assert sum(int(m.sum()) for m in ref.masks.values()) == round(0.6 * sum(t.values.numel() for t in targets))
    threshold = max(float(a[m].max()) for a, m in zip(magnitudes, ref.masks.values()))
    tied = [(a == threshold) for a in magnitudes]
    pruned_tied = sum(int((m & t).sum()) for m, t in zip(ref.masks.values(), tied))
    assert 0 < pruned_tied < sum(int(t.sum()) for t in tied) and sum(int(t.sum()) for t in tied) > 1000  # a tie split
    sharded = read_pieces(sorted((out / "masks").glob(MASK_FILE.format(rank="*"))), targets)
    assert sharded.keys() == ref.masks.keys()
    for name in ref.masks:
        assert torch.equal(sharded[name], ref.masks[name]), name
    # Four optimizer steps later every pruned weight is still zero (fp32 masters included: they would
    # revive the weights at the next all-gather), and the checkpoint's masks load in one process.
    finals = [torch.load(out / "final.pt")]
    if engine != "fsdp2":  # DeepSpeed's checkpoint holds the fp32 master partitions
        finals.append(load_full_weights(tmp_path / "run")[1])
    for final in finals:
        for t in targets:
            assert int((final[t.name].view(-1)[ref.masks[t.name]] != 0).sum()) == 0, t.name
            assert int((final[t.name] != 0).sum()) == int((~ref.masks[t.name]).sum()), t.name
    # The weights the engine computes with are the masked ones (ZeRO-3 keeps small parameters
    # gathered between steps): its last validation loss is that of the final weights in one process.
    val = _val_loss(local, finals[0])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["val/austen"] == pytest.approx(val, abs=1e-5)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    reloaded = read_pieces(sorted(ckpt.glob(MASK_FILE.format(rank="*"))), targets)
    assert all(torch.equal(reloaded[n], ref.masks[n]) for n in ref.masks)
