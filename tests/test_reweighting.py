"""Loss-based reweighting: the strategies' exact weights, the weighted backward with a plain logged
loss, the same weights on one and two ranks (real gloo all-gather), domain weights that follow the
excess loss, and bit-exact resumption of both."""
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cptrain.errors import UserError
from tests.conftest import tiny_overrides
from cptrain.trainer.config import load_config
from cptrain.trainer.reweighting import DomainSection, DomainWeights, attach_sample_weights, eg_update, sample_weights
from tests.multiproc import run_ranks

pytestmark = pytest.mark.reweighting


def _softmax(f, r=1.0):
    e = [math.exp(x / r) for x in f]
    return [x / sum(e) for x in e]


# ---------------------------------------------------------------- instance weights

@pytest.mark.parametrize("strategy, f", [
    # losses 1, 2, 3, 4 normalize to h = -1, -1/3, 1/3, 1 (delta 1)
    ("linupper", [0.0, 2 / 3, 1.0, 1.0]),    # min(h + 1, 1)
    ("quadratic", [0.0, 8 / 9, 8 / 9, 0.0]),  # 1 - h^2
    ("extremes", [1.0, 1 / 3, 1 / 3, 1.0]),   # |h|
])
def test_strategy_weights_on_known_losses(strategy, f):
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    w = sample_weights(losses, strategy)
    assert w.tolist() == pytest.approx(_softmax(f), abs=1e-15)
    # A temperature flattens the weights (r = 2: exp(f / 2)); the order of samples does not matter.
    w2 = sample_weights(losses.flip(0), strategy, temperature=2.0)
    assert w2.flip(0).tolist() == pytest.approx(_softmax(f, 2.0), abs=1e-15)


def test_delta_and_degenerate_batches():
    losses = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)  # h = -2, 0, 2 with delta 2
    assert sample_weights(losses, "linupper", delta=2.0).tolist() == pytest.approx(_softmax([0.0, 2.0, 2.0]), abs=1e-15)
    assert sample_weights(losses, "quadratic", delta=2.0).tolist() == pytest.approx(_softmax([0.0, 1.0, 0.0]), abs=1e-15)
    same = sample_weights(torch.full((4,), 2.5, dtype=torch.float64), "linupper")
    assert same.tolist() == [0.25] * 4  # all losses equal: uniform


def _tiny_model():
    from cptrain.model.presets import preset
    from cptrain.model.decoder import Decoder
    torch.manual_seed(0)
    model = Decoder(preset("tiny"))
    model.init_weights()
    return model


@pytest.mark.parametrize("chunk", [0, 40])
def test_weighted_loss_is_backpropagated_plain_loss_is_reported(chunk):
    from cptrain.trainer.loss import lm_loss, token_losses
    model = _tiny_model()
    tokens = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(1))
    m = torch.tensor([0.5, 1.5, 0.25, 1.75])
    plain_loss, plain = lm_loss(model, {"tokens": tokens}, scale=0.1, chunk_tokens=chunk)
    loss, stats = lm_loss(model, {"tokens": tokens, "sample_weight": m}, scale=0.1, chunk_tokens=chunk)
    assert torch.equal(stats["loss_sum"], plain["loss_sum"]) and torch.equal(stats["sample_loss"], plain["sample_loss"])
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = (token_losses(model, {"tokens": tokens}).sum(dim=1) * m).sum() * 0.1
    assert torch.allclose(loss, ref, rtol=1e-5)
    ref.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-7), n
    assert not torch.allclose(loss, plain_loss)


# ---------------------------------------------------------------- domain weights

def test_eg_update_exact():
    w = eg_update(np.array([0.5, 0.5]), np.array([1.0, 0.0]), eta=1.0, smoothing=0.0)
    assert w.tolist() == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)], abs=1e-15)
    w = eg_update(np.array([0.25, 0.75]), np.array([0.0, 0.0]), eta=3.0, smoothing=0.2)
    assert w.tolist() == pytest.approx([0.8 * 0.25 + 0.1, 0.8 * 0.75 + 0.1], abs=1e-15)


def test_domain_weights_move_toward_higher_excess_loss():
    dw = DomainWeights(DomainSection(signal="train", eta=2.0, smoothing=0.1), ["a", "b"], [1.0, 1.0], None)
    first = {}
    for losses in ([3.0, 3.0], [2.0, 2.8], [1.5, 2.7]):  # b learns slower: higher loss than at the start
        dw.observe_train(torch.tensor([losses[0] * 4, losses[1] * 2]), torch.tensor([4.0, 2.0]))
        logged = dw.update({})
        first = first or logged
    assert first == {"domain_weight/a": 0.5, "domain_weight/b": 0.5}  # the reference step moves nothing
    assert logged["domain_weight/b"] > 0.8 and logged["domain_weight/a"] >= 0.05  # the floor: c / K
    assert dw.reference == {"a": 3.0, "b": 3.0}
    again = DomainWeights(dw.cfg, ["a", "b"], [1.0, 1.0], json.loads(json.dumps(dw.state_dict())))
    assert again.state_dict() == dw.state_dict()


def test_bad_reweighting_config_is_refused(tmp_path):
    def cfg(**extra):
        return load_config(None, tiny_overrides(tmp_path, tmp_path, **extra))
    with pytest.raises(UserError, match="reweighting.instance.delta"):
        cfg(**{"reweighting.instance.temperature": 0})
    with pytest.raises(UserError, match="at least two data.domains"):
        cfg(**{"reweighting.domain.signal": "train"})
    two = {"data.domains": f"[{{name: a, path: {tmp_path}}}, {{name: b, path: {tmp_path}}}]"}
    with pytest.raises(UserError, match="reference names unknown domains"):
        cfg(**two, **{"reweighting.domain.signal": "train", "reweighting.domain.reference": "{c: 1.0}"})
    with pytest.raises(UserError, match="eval.interval_tokens"):
        cfg(**two, **{"reweighting.domain.signal": "val"})
    with pytest.raises(UserError, match="data.phases"):
        cfg(**two, **{"reweighting.domain.signal": "train", "data.phases": "[{until_tokens: 100, weights: {a: 1}}]"})


# ---------------------------------------------------------------- real runs on two domains

@pytest.fixture(scope="module")
def two_domains(tmp_path_factory) -> Path:
    from tests.test_data_support import make_domains
    root = tmp_path_factory.mktemp("rw_data")
    make_domains(root, 32)
    return root


def _two_domain_overrides(run_dir: Path, root: Path, **extra) -> list[str]:
    base = {"model.vocab_size": 800, "data.seq_len": 32, "train.global_batch_tokens": 512, "train.max_tokens": 6144,
            "data.domains": f"[{{name: en, path: {root / 'en'}}}, {{name: es, path: {root / 'es'}}}]",
            "eval.max_samples": 8, "eval.at_start": False}
    return tiny_overrides(run_dir, root / "en", **{**base, **extra})


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


_COMPARED = ("loss", "grad_norm", "train/en", "train/es", "val/en", "val/es")


def _compared(row: dict) -> dict:
    return {k: v for k, v in row.items() if k in _COMPARED or k.startswith(("reweight/", "domain_weight/"))}


@pytest.mark.resume
def test_resumed_run_reproduces_weights_and_losses(tmp_path, two_domains):
    from cptrain.trainer.loop import run
    extra = {"reweighting.instance.strategy": "linupper", "reweighting.instance.warmup_tokens": 1024,
             "reweighting.domain.signal": "train", "reweighting.domain.interval_tokens": 1024,
             "reweighting.domain.eta": 2.0, "checkpoint.interval_tokens": 2048, "eval.interval_tokens": 2048,
             "train.max_tokens": 4096}
    cfg = load_config(None, _two_domain_overrides(tmp_path / "run", two_domains, **extra))
    full = [_compared(r) for r in run(cfg)]
    assert "reweight/max_weight" not in full[1] and full[2]["reweight/max_weight"] > 1.0  # on after 1024 tokens
    updates = [r["domain_weight/en"] for r in full if "domain_weight/en" in r]
    assert len(updates) == 4 and len(set(updates)) > 2
    logged = _metrics(tmp_path / "run")
    assert [r["step"] for r in logged if "domain_weight/en" in r] == [2, 4, 6, 8]
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.rmtree(ckpts / "step-00000008")
    (ckpts / "latest").write_text("step-00000004\n")
    resumed = [_compared(r) for r in run(cfg, resume=True)]
    assert resumed == full[4:]  # every loss and weight, bit for bit


def test_domain_weights_follow_the_excess_loss_in_a_run(tmp_path, two_domains):
    """Constructed case: en's reference loss is 0, es's is its first evaluation, so en's excess
    loss is far higher; its weight rises and the loader samples it more."""
    from cptrain.trainer.loop import Trainer
    extra = {"reweighting.domain.signal": "val", "reweighting.domain.reference": "{en: 0.0}",
             "reweighting.domain.eta": 0.5, "reweighting.domain.smoothing": 0.2, "eval.interval_tokens": 1024,
             "eval.at_start": True, "train.max_tokens": 4096}
    trainer = Trainer(load_config(None, _two_domain_overrides(tmp_path / "run", two_domains, **extra)))
    trainer.train()
    weights = [r["domain_weight/en"] for r in _metrics(tmp_path / "run") if "domain_weight/en" in r]
    assert len(weights) == 5 and all(a < b for a, b in zip(weights, weights[1:])), weights
    assert weights[-1] == pytest.approx(0.9, abs=0.01)  # exp(0.5 * excess) saturates at the floor c / K
    override = trainer.loader.state_dict()["weights_override"]["weights"]
    assert override["en"] == weights[-1]
    drawn = trainer.loader.state_dict()["cursors"]
    assert drawn["en"] > 2 * drawn["es"], drawn


# ---------------------------------------------------------------- one rank vs two ranks (gloo)

def first_step_weights(trainer) -> dict:
    """Sample weights of the first step's micro-batches on this rank (from a fresh loader at the
    run's start position) with their global sample ids, through the real collective."""
    from cptrain.data_pipeline.loader import build_train_loader
    from cptrain.trainer.engines.spec import autocast_for
    cfg, layout = trainer.cfg, trainer.layout
    loader = build_train_loader(trainer.data, micro_batch_size=cfg.train.micro_batch_size, rank=layout.dp_rank,
                                world_size=layout.dp_size, seed=cfg.seed)
    batches = [next(loader) for _ in range(trainer.spec.accumulation)]
    attach_sample_weights(trainer.engine, batches, cfg.reweighting.instance, 0,
                          lambda: autocast_for(layout.device, trainer.spec.bf16))
    return {"ids": [b["sample_id"] for b in batches], "weights": [b["sample_weight"] for b in batches]}


def _launch(overrides: list[str], out: Path, world: int = 2) -> None:
    (out / "args.json").write_text(json.dumps(overrides))
    run_ranks([sys.executable, "-m", "tests.reweighting_worker", str(out)], world)


@pytest.mark.distributed
def test_two_ranks_give_the_weights_of_one(tmp_path, austen_data):
    """The global batch of 32 samples: one rank with 4 accumulation micro-batches, or two DDP ranks
    with 2 each; the weights (in global sample order) and the first step agree bit for bit."""
    from cptrain.trainer.loop import Trainer
    extra = {"reweighting.instance.strategy": "extremes", "train.global_batch_tokens": 2048, "train.max_tokens": 6144}
    out = tmp_path / "out"
    out.mkdir()
    _launch(tiny_overrides(tmp_path / "two", austen_data, **extra), out)
    ranks = [torch.load(out / f"weights{r}.pt") for r in range(2)]
    order = [(j, r) for j in range(2) for r in range(2)]  # micro-batch j of rank r: global samples (2j + r) * 8 ...
    two_ids = torch.cat([ranks[r]["ids"][j] for j, r in order])
    two_w = torch.cat([ranks[r]["weights"][j] for j, r in order])

    one = Trainer(load_config(None, tiny_overrides(tmp_path / "one", austen_data, **extra)))
    ref = first_step_weights(one)
    assert torch.equal(torch.cat(ref["ids"]), two_ids)
    assert torch.equal(torch.cat(ref["weights"]), two_w)
    assert two_w.mean().item() == pytest.approx(1.0) and two_w.std() > 0.05
    one.train()
    a, b = ([r for r in _metrics(tmp_path / name) if "loss" in r] for name in ("one", "two"))
    assert len(a) == len(b) == 3
    assert {**_compared(a[0]), "grad_norm": 0} == {**_compared(b[0]), "grad_norm": 0}  # loss and weights: same bits
    for ra, rb in zip(a, b):  # the gradients: DDP averages them in another order
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
        assert ra["reweight/weighted_loss"] == pytest.approx(rb["reweight/weighted_loss"], rel=1e-4)
