"""Meta-experience replay (trainer/mer.py) on a real LocalEngine and its optimizer: the Reptile
interpolation every k steps, its anchor reset, an exact resume from a checkpoint, anchors saved by
sharded ranks read back whole (and the reverse), the config checks, and the cost of a step."""
import time

import pytest
import torch

from cptrain.errors import UserError
from cptrain.trainer.config import load_config
from cptrain.trainer.continual import MERSection
from cptrain.trainer.engines import build_engine
from cptrain.trainer.engines.layout import Layout
from cptrain.trainer.engines.local import LocalEngine
from cptrain.trainer.engines.spec import engine_spec
from cptrain.trainer.loss import lm_loss
from cptrain.trainer.mer import ANCHOR_FILE, MetaReplay
from cptrain.trainer.params import Target, collect_targets

pytestmark = pytest.mark.continual


TINY = ["--model.preset=tiny", "--model.vocab_size=256", "--model.max_seq_len=32", "--data.seq_len=32",
        "--train.micro_batch_size=4", "--train.global_batch_tokens=128", "--log.progress=false"]


def _engine(tmp_path, seed=0) -> LocalEngine:
    cfg = load_config(None, [f"--run_dir={tmp_path / 'run'}", f"--seed={seed}", *TINY])
    return build_engine(engine_spec(cfg, Layout()), cfg.model.arch, None, seed=cfg.seed)  # as the trainer builds it


def _train(engine: LocalEngine, steps, mer: MetaReplay | None = None) -> None:
    """Real optimizer steps on batches fixed by the step number (so a resumed run sees the same data)."""
    for s in steps:
        g = torch.Generator().manual_seed(1000 + s)
        batch = {"tokens": torch.randint(0, 256, (4, 33), generator=g)}
        engine.forward_backward(batch, lambda m, b: lm_loss(m, b, 1 / 128), sync=True)
        engine.step(1e-2)
        if mer is not None:
            mer.after_update(s)


def _weights(engine) -> dict:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _mer(engine, interval=2, strength=0.5, step=0) -> MetaReplay:
    return MetaReplay(MERSection(interval, strength), lambda: collect_targets(engine, ["all"])[0], False, step)


def test_interpolates_every_k_steps_and_resets_the_anchor(tmp_path):
    engine = _engine(tmp_path)
    mer = _mer(engine, interval=2, strength=0.5)
    theta0 = _weights(engine)
    _train(engine, [1])
    assert not mer.after_update(1)  # nothing until k steps have passed
    _train(engine, [2])
    theta2 = _weights(engine)
    assert mer.after_update(2) and mer.anchor_step == 2
    for k, v in _weights(engine).items():
        torch.testing.assert_close(v, theta0[k] + 0.5 * (theta2[k] - theta0[k]), rtol=1e-6, atol=1e-7)
    anchor = _weights(engine)
    _train(engine, [3, 4])
    theta4 = _weights(engine)
    assert mer.after_update(4)
    for k, v in _weights(engine).items():  # the anchor is the interpolated weights, not theta0
        torch.testing.assert_close(v, anchor[k] + 0.5 * (theta4[k] - anchor[k]), rtol=1e-6, atol=1e-7)
    # strength 1 keeps every step: the same weights as no MER at all
    a, b = _engine(tmp_path), _engine(tmp_path)
    _train(a, range(1, 5), _mer(a, 2, 1.0))
    _train(b, range(1, 5))
    assert all(torch.equal(x, y) for x, y in zip(_weights(a).values(), _weights(b).values()))


def test_resume_continues_exactly(tmp_path):
    """A run stopped at step 3 (between two interpolations) and resumed from its checkpoint (engine
    and anchor) ends with the same weights, bit for bit, as the uninterrupted run."""
    whole = _engine(tmp_path)
    _train(whole, range(1, 8), _mer(whole, interval=3))

    first = _engine(tmp_path)
    mer = _mer(first, interval=3)
    _train(first, range(1, 5), mer)  # interpolated at 3; step 4 moved on from that anchor
    folder = tmp_path / "ckpt"
    folder.mkdir()
    first.save(folder)
    assert mer.save(folder, rank=0) == [folder / ANCHOR_FILE.format(rank=0)]

    second = _engine(tmp_path, seed=1)  # other initial weights: all must come from the checkpoint
    second.load(folder, optimizer=True)
    resumed = _mer(second, interval=3)
    assert resumed.load(folder) and resumed.anchor_step == 3
    _train(second, range(5, 8), resumed)
    assert all(torch.equal(x, y) for x, y in zip(_weights(whole).values(), _weights(second).values()))


def _halves(engine, rank: int) -> list[Target]:
    """Rank `rank` of 2 holding half of every flattened parameter, as a sharded engine does."""
    out = []
    for t in collect_targets(engine, ["all"])[0]:
        n = t.values.numel()
        lo, hi = (0, n // 2) if rank == 0 else (n // 2, n)
        piece = t.values[lo:hi]
        out.append(Target(t.name, t.shape, lo, piece, [(0, hi - lo, piece)]))
    return out


def test_anchor_reads_back_at_any_world_size(tmp_path):
    engine = _engine(tmp_path)
    _train(engine, [1, 2])
    whole = _mer(engine)  # anchor: the weights after step 2
    # two sharded ranks write their halves; one process reads the whole anchor back
    shards = tmp_path / "two"
    shards.mkdir()
    for rank in (0, 1):
        MetaReplay(MERSection(2, 0.5), lambda r=rank: _halves(engine, r), True, 2).save(shards, rank)
    one = _mer(engine)
    _train(engine, [3])  # the weights move on; the anchor must come from the files
    assert one.load(shards) and one.anchor_step == 2
    assert all(torch.equal(one.anchor[k], whole.anchor[k]) for k in whole.anchor)
    # and one process's anchor read back by two ranks: each gets its half
    single = tmp_path / "one"
    single.mkdir()
    whole.save(single, rank=0)
    for rank in (0, 1):
        half = MetaReplay(MERSection(2, 0.5), lambda r=rank: _halves(engine, r), True)
        assert half.load(single)
        for t in _halves(engine, rank):
            n = whole.anchor[t.name].numel()
            assert torch.equal(half.anchor[t.name], whole.anchor[t.name][t.start:t.start + t.values.numel()]), (t.name, n)


def _zero12(weights: dict, rank: int) -> list[Target]:
    """Rank `rank` of 2 as ZeRO-1/2 holds a parameter: the whole bf16 weight, and the fp32 master of
    its half of the flat buffer (here: of each tensor)."""
    out = []
    for name, w in weights.items():
        full, n = w.to(torch.bfloat16).view(-1).clone(), w.numel()
        lo, hi = (0, n // 2) if rank == 0 else (n // 2, n)
        out.append(Target(name, tuple(w.shape), 0, full, [(0, n, full), (lo, hi, w.view(-1)[lo:hi].clone())]))
    return out


def test_zero12_layout_keeps_the_masters_precision(tmp_path):
    """Replicated bf16 weights with fp32 master partitions: the anchor is taken from the masters, each
    rank saves its partitions, and one process reads back the fp32 masters exactly; an interpolation
    writes the master and the bf16 replica alike."""
    engine = _engine(tmp_path)
    weights = {k: v + 1e-4 * torch.randn_like(v) for k, v in _weights(engine).items()}  # off the bf16 grid
    ranks = [_zero12(weights, r) for r in (0, 1)]
    mers = [MetaReplay(MERSection(1, 0.5), lambda r=r: ranks[r], False) for r in (0, 1)]
    for r in (0, 1):
        assert mers[r].save(tmp_path, r) == [tmp_path / ANCHOR_FILE.format(rank=r)]
    one = _mer(engine)
    assert one.load(tmp_path)
    assert all(torch.equal(one.anchor[k], w.view(-1)) for k, w in weights.items())
    for t in ranks[0]:
        t.copies[1][2].add_(1.0)  # an optimizer step on rank 0's masters
    assert mers[0].after_update(1)
    for t in ranks[0]:
        lo, hi, master = t.copies[1]
        expect = weights[t.name].view(-1)[lo:hi] + 0.5
        torch.testing.assert_close(master, expect, rtol=1e-6, atol=1e-6)
        assert torch.equal(t.values[lo:hi], master.to(torch.bfloat16))


@pytest.mark.parametrize("mer, needle", [("{interval: 10}", "strength"), ("{interval: 10, strength: 1.5}", "(0, 1]"),
                                         ("{interval: -1, strength: 0.5}", ">= 0")])
def test_bad_mer_config_is_refused(tmp_path, mer, needle):
    with pytest.raises(UserError, match="continual.mer") as e:
        load_config(None, [f"--run_dir={tmp_path}", *TINY, f"--continual.mer={mer}"])
    assert needle in str(e.value)


def test_cost_is_one_pass_over_the_weights(tmp_path):
    """An interpolation costs a small fraction of an optimizer step (forward, backward, AdamW) on
    the same model: measured, and asserted below a fifth."""
    engine = _engine(tmp_path)
    mer = _mer(engine, interval=1)
    step = min(_timed(lambda: _train(engine, [1])) for _ in range(3))
    interp = min(_timed(lambda: mer.after_update(mer.anchor_step + 1)) for _ in range(3))
    print(f"\nMER interpolation {interp * 1e3:.2f} ms vs training step {step * 1e3:.2f} ms")
    assert interp < step / 5


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
