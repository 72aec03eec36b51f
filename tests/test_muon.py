"""Muon (trainer/muon.py): the Newton-Schulz step against an SVD, the update against a plain
re-implementation of Liu et al.'s rule, the AdamW half against torch's AdamW, which parameters take
which update, training on the demo corpus, exact resume, and the refusals. Muon under DDP and FSDP2
on two ranks (and resumed at another world size) runs in tests/test_distributed.py's chain."""
import math
import shutil

import pytest
import torch

from cptrain.errors import UserError
from cptrain.model.decoder import Decoder
from cptrain.model.presets import preset
from cptrain.trainer.config import OptimSection, load_config
from cptrain.trainer.engines.base import build_optimizer, param_groups
from cptrain.trainer.loop import Trainer, run
from cptrain.trainer.muon import Muon, orthogonalize
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.optim
MUON = {"optim.name": "muon", "schedule.lr": 3e-3}


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 96)])
def test_newton_schulz_approaches_the_orthogonal_factor(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x = orthogonalize(g)
    u, sigma, vh = torch.linalg.svd(g, full_matrices=False)
    f = torch.diagonal(u.T @ x @ vh.T)  # x = U f(S) V^T: what the iteration made of each singular value
    assert torch.allclose(u @ torch.diag(f) @ vh, x, atol=1e-4), "x keeps g's singular vectors"
    # Jordan et al.'s quintic trades exactness for speed: five steps take every singular value above
    # about 1/20 of the largest into [0.7, 1.2] (the smallest of a square Gaussian matrix lag behind).
    settled = sigma > sigma[0] / 20
    assert f[settled].min() > 0.65 and f.max() < 1.21, f
    assert settled.float().mean() > 0.9


def _reference_muon_step(w, grad, buf, lr, wd, mu=0.95):
    """Liu et al. 2025, Algorithm 1, written out: Nesterov momentum, orthogonalize, scale to RMS 0.2."""
    buf = mu * buf + (1 - mu) * grad
    direction = (1 - mu) * grad + mu * buf
    x = direction / (direction.norm() + 1e-7)
    transpose = x.shape[0] > x.shape[1]
    x = x.T if transpose else x
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    x = x.T if transpose else x
    return w * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(w.shape)) * x, buf


def test_muon_update_matches_the_papers_rule_and_has_adamw_rms():
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(48, 160, generator=gen) * 0.02
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([{"params": [p], "muon": True, "lr": 0.01, "weight_decay": 0.1}])
    w, buf = w0.clone(), torch.zeros_like(w0)
    for _ in range(3):
        grad = torch.randn(48, 160, generator=gen)
        p.grad = grad.clone()
        before = p.detach().clone()
        opt.step()
        w, buf = _reference_muon_step(w, grad, buf, lr=0.01, wd=0.1)
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)
        rms = ((p.detach() - before * (1 - 0.01 * 0.1)) / 0.01).pow(2).mean().sqrt()
        assert 0.15 < rms < 0.25, rms  # AdamW's typical update RMS, so its LR carries over


def test_the_adamw_half_is_torchs_adamw_bit_for_bit():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    ref = torch.optim.AdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    ours = Muon([{"params": list(b.parameters()), "lr": 1e-2, "weight_decay": 0.1}])
    for i in range(5):
        x = torch.randn(4, 16)
        for model, opt in ((a, ref), (b, ours)):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert ours.state_dict()["state"][0].keys() == ref.state_dict()["state"][0].keys()


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    cfg = OptimSection(name="muon")
    model = Decoder(preset("tiny"))
    opt = build_optimizer(param_groups(model, 0.1, by_role=True), cfg, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("layers.")}
    rest = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert "tok_embeddings.weight" in rest and any("norm" in n for n in rest)


def test_muon_learns_the_demo_corpus_faster_than_adamw(tmp_path, austen_data):
    """Equal tokens, LR and weight decay (the update-RMS matching lets AdamW's carry over). Measured:
    train loss 6.25 -> 4.19 (val 4.26) with Muon, -> 5.14 (val 5.05) with AdamW."""
    val = {}
    for name in ("muon", "adamw"):
        rows = run(load_config(None, tiny_overrides(tmp_path / name, austen_data, **{
            "optim.name": name, "schedule.lr": 1e-2, "eval.at_start": False})))
        val[name] = rows[-1]["val/austen"]
        if name == "muon":
            losses = [r["loss"] for r in rows if "loss" in r]
            assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.75 * losses[0], losses
    assert val["muon"] < val["adamw"] - 0.3, val


@pytest.mark.resume
def test_muon_resume_is_bit_exact(tmp_path, austen_data):
    cfg = load_config(None, tiny_overrides(tmp_path / "run", austen_data, **MUON, **{
        "train.max_tokens": 8192, "checkpoint.interval_tokens": 4096, "eval.at_start": False}))
    full = [(r["step"], r["loss"]) for r in run(cfg) if "loss" in r]
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.rmtree(ckpts / "step-00000008")
    (ckpts / "latest").write_text("step-00000004\n")
    resumed = [(r["step"], r["loss"]) for r in run(cfg, resume=True) if "loss" in r]
    assert resumed == full[4:]


def test_muon_is_refused_where_it_cannot_run(tmp_path, austen_data):
    with pytest.raises(UserError, match="optim.name=muon needs train.engine local or fsdp2"):
        load_config(None, tiny_overrides(tmp_path, austen_data, **{"optim.name": "muon", "train.engine": "deepspeed"}))
    with pytest.raises(UserError, match="optim.fused=on is AdamW's fused kernel"):
        load_config(None, tiny_overrides(tmp_path, austen_data, **{"optim.name": "muon", "optim.fused": "on"}))
    with pytest.raises(ValueError, match="2-D matrices only"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(3))], "muon": True}])
    assert Trainer(load_config(None, tiny_overrides(tmp_path / "ok", austen_data, **MUON))).engine.optimizer.__class__ is Muon
