"""Continual-pretraining laws: the CPT law (Wang et al. 2025) and the D-CPT law (Que et al. 2024)
recover the parameters that generated noisy curves and points, and fit, predict and suggest on real
continual runs (tiny models continued on Spanish at three replay fractions)."""
import csv
import json
import math

import numpy as np
import pytest

from cptrain.errors import UserError
from cptrain.launch.cli import main
from cptrain.trainer.analysis.scaling import cpt as K
from cptrain.trainer.analysis.scaling import cpt_runs, cpt_suggest, dcpt
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import run
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.scaling, pytest.mark.usefixtures("one_thread")]
REPLAYS = (0.0, 0.25, 0.5)
# Parameters of the paper's size (their Fig. 3 fits of FineWeb -> Knowledge-Pile: L0 ~3.0, A ~0.4-0.5,
# alpha 0.5-0.7, C ~0.3), with E and beta set so that the shift term bends within the curves.
TRUE = {"old": dict(L0=3.05, A=0.49, alpha=0.5, C1=0.3, C2=0.3, B=0.37, E=300.0, beta=0.4, a1=0.5, a2=2.0, S1pt=0.0),
        "new": dict(L0=3.02, A=0.41, alpha=0.68, C1=0.28, C2=0.32, B=-0.67, E=3000.0, beta=0.3, a1=0.3, a2=1.0, S1pt=0.0)}


def _cosine(n: int, peak: float, warm: int, floor: float) -> np.ndarray:
    """LR of steps 0..n: linear warmup, cosine to floor * peak (entry 0: no step)."""
    s = np.arange(n + 1, dtype=float)
    u = np.clip((s - warm) / (n - warm), 0, 1)
    lr = np.where(s < warm, s / warm, floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * u))) * peak
    lr[0] = 0.0
    return lr


def _synthetic(role: str, rng, noise: float):
    """A 2000-step pretraining, then CPT at two peak LRs x three replay fractions (1000 steps), the
    loss every 25-50 steps with log-normal noise; and a held-out schedule (linear decay, replay 0.1)."""
    pt = _cosine(2000, 2e-4, 100, 0.1)
    tr = K.transfer_of(pt)
    form = K.Form(role, True, (("S1pt", 0.0),))
    parts = [K.pretrain_points(pt, np.arange(50, 2001, 50), np.ones(40), "pt")]
    for peak in (1e-4, 2e-4):
        for r in REPLAYS:
            parts.append(K.cpt_points(tr, _cosine(1000, peak, 50, 0.0), r, np.arange(0, 1001, 25), np.ones(41), f"{peak}/{r}"))
    pts = K.Points.concat(parts)
    pts.loss = K.predict(TRUE[role], form, pts) * np.exp(rng.normal(0, noise, len(pts.loss)))
    held_lr = np.concatenate([[0.0], np.linspace(0, 1.5e-4, 50), np.linspace(1.5e-4, 0, 951)[1:]])
    held = K.cpt_points(tr, held_lr, 0.1, np.arange(0, 1001, 10), np.ones(101), "held")
    return pts, form, held


@pytest.mark.parametrize("role", ["old", "new"])
def test_cpt_law_recovers_known_parameters(role):
    pts, form, held = _synthetic(role, np.random.default_rng(0), 3e-4)
    fit = K.fit_domain(pts, form)
    for k, v in TRUE[role].items():
        if k != "S1pt":  # held: the pretraining is known
            assert fit.params[k] == pytest.approx(v, rel=0.35, abs=0.05), k
    for k in ("L0", "A", "alpha", "B"):
        assert fit.params[k] == pytest.approx(TRUE[role][k], rel=0.03), k
    # the noise sets the objective: 0.5 (3e-4)^2 per point
    assert fit.objective < 1.5 * 0.5 * 3e-4 ** 2 * len(pts.loss)
    err = np.abs(K.predict(fit.params, form, held) - K.predict(TRUE[role], form, held))
    assert err.max() < 2e-3, "a held-out schedule and replay fraction are predicted"


def test_cpt_areas_match_the_paper_definitions():
    """S1 = summed LR; S2 = sum_i sum_{k<=i} (lr[k-1] - lr[k]) lam^(i-k), split at the transfer, the
    momentum carried over (Wang et al. 2025 Eq. 1-2, Tissue et al. 2024)."""
    rng = np.random.default_rng(1)
    pt, cpt_lr = np.concatenate([[0.0], rng.uniform(0, 1e-3, 30)]), np.concatenate([[0.0], rng.uniform(0, 1e-3, 20)])
    whole = np.concatenate([pt, cpt_lr[1:]])
    lam = K.TISSUE_DECAY
    s2 = [sum((whole[k - 1] - whole[k]) * lam ** (i - k) for k in range(1, i + 1)) for i in range(len(whole))]
    tr = K.transfer_of(pt)
    s1cpt, s2cpt = K.cpt_areas(tr, cpt_lr)
    assert tr.s1 == pytest.approx(pt.sum()) and tr.s2 == pytest.approx(sum(s2[:31]))
    np.testing.assert_allclose(s1cpt, np.cumsum(cpt_lr), rtol=1e-12)
    np.testing.assert_allclose(s2cpt, np.cumsum(s2[30:]) - s2[30], rtol=1e-10, atol=1e-15)


def _dcpt_truth():
    return {"E": 1.9, "A": 420.0, "B": 300.0, "C": 0.05, "alpha": 0.34, "beta": 0.28, "eta": 0.6, "gamma": 0.5, "eps": 0.02}


def test_dcpt_law_recovers_known_parameters():
    """Points on the paper's grid of mixture ratios (0.1-0.9) at three model sizes and six token
    counts, 0.1% noise. The exponents of N, D and r are pinned down; C, gamma and eps trade off (the
    C term varies little over r in 0.1-0.9), which the predictions over that range do not see."""
    p = _dcpt_truth()
    n, d, r = (g.ravel() for g in np.meshgrid([5e8, 1.8e9, 4e9], np.logspace(9, 10.3, 6), [0.1, 0.2, 0.33, 0.5, 0.67, 0.8, 0.9]))
    pts = dcpt.Points(n, d, r, _dcpt_law(p, n, d, r) * np.exp(np.random.default_rng(0).normal(0, 1e-3, len(n))))
    fit = dcpt.fit(pts)
    for k in ("alpha", "beta", "eta"):
        assert fit.params[k] == pytest.approx(p[k], rel=0.05), k
    assert fit.params["E"] == pytest.approx(p["E"], rel=0.05)
    n2, d2, r2 = np.full(9, 7e9), np.full(9, 3e10), np.linspace(0.1, 0.9, 9)
    pred = dcpt.predict(fit.theta, n2, d2, r2)[0]
    assert np.abs(pred / _dcpt_law(p, n2, d2, r2) - 1).max() < 0.005, "a larger N and D are predicted within 0.5%"


def _dcpt_law(p, n, d, r):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] * r ** p["eta"] / d ** p["beta"] + p["C"] / (r + p["eps"]) ** p["gamma"]


# --- real runs --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpt_runs_dir(austen_data, spanish_data, tmp_path_factory):
    """A tiny model pretrained on English (12 steps), continued on Spanish for 10 steps at three
    replay fractions of English, evaluated at every step."""
    root = tmp_path_factory.mktemp("cpt")
    run(load_config(None, tiny_overrides(root / "pre", austen_data, **{"train.max_tokens": 12288, "eval.interval_tokens": 2048})))
    for r in REPLAYS:
        run(load_config(None, tiny_overrides(root / f"cpt{r}", spanish_data, **{
            "model.init_from": str(root / "pre"), "data.domains": f"[{{name: spanish, path: {spanish_data}}}]",
            "data.replay": f"[{{name: austen, path: {austen_data}}}]", "data.replay_fraction": r,
            "train.max_tokens": 10240, "eval.interval_tokens": 1024, "schedule.kind": "rewarm",
            "schedule.warmup_tokens": 2048, "schedule.lr": 2e-3})))
    return root


def _runs(root):
    return [str(root / f"cpt{r}") for r in REPLAYS]


def test_cpt_fit_predict_and_forgetting_on_runs(cpt_runs_dir, tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(["scaling", "fit", *_runs(cpt_runs_dir), "--law", "cpt", "--out", str(out)]) == 0
    res = json.loads((out / "fit.json").read_text())
    assert res["law"] == "cpt" and res["replay_terms"] and res["transfer"]["known"] and res["transfer"]["steps"] == 12
    doms = res["domains"]
    assert doms["austen"]["role"] == "old" and doms["spanish"]["role"] == "new"
    assert doms["austen"]["pretrain_points"] and not doms["spanish"]["pretrain_points"]
    assert "C1" in doms["spanish"]["fixed"] and "C1" not in doms["austen"]["fixed"]  # no Spanish evaluations in pretraining
    assert doms["spanish"]["n_points"] == 3 * 11 and doms["austen"]["n_points"] == 3 * 11 + 6
    runs = [cpt_runs.read_run(cpt_runs_dir / f"cpt{r}", None) for r in REPLAYS]
    for d in doms:
        measured = np.concatenate([r.evals[d][1] for r in runs])
        errors = np.concatenate([np.abs(cpt_runs.predict_schedule(res, r.lr, r.replay)[d][r.evals[d][0]] - r.evals[d][1])
                                 for r in runs])
        # the median: a tiny model's evaluation can jump once by 0.5 (an outlier the Huber loss discounts)
        assert np.median(errors) < 0.2 * np.mean(np.abs(measured - measured.mean())), d
    assert (out / "curves.png").stat().st_size > 0

    # predict the 0.25 run's own schedule: the fit's values at its evaluations
    rows = [json.loads(x) for x in (cpt_runs_dir / "cpt0.25" / "metrics.jsonl").read_text().splitlines()]
    sched = tmp_path / "sched.csv"
    sched.write_text("step,lr\n0,0\n" + "".join(f"{r['step']},{r['lr']}\n" for r in rows if "lr" in r))
    assert main(["scaling", "predict", "--fit", str(out / "fit.json"), "--curve", str(sched), "--replay", "0.25",
                 "--out", str(tmp_path / "pred.csv")]) == 0
    pred = list(csv.DictReader(open(tmp_path / "pred.csv")))
    assert list(pred[0]) == ["step", "lr", "loss_pred/austen", "loss_pred/spanish"] and len(pred) == 11
    steps, losses = runs[1].evals["spanish"]
    mae = np.mean([abs(float(pred[s]["loss_pred/spanish"]) - v) for s, v in zip(steps, losses)])
    assert mae == pytest.approx(doms["spanish"]["fit_metrics"]["cpt0.25"]["mae"], rel=1e-9)

    capsys.readouterr()
    assert main(["forgetting", str(cpt_runs_dir / "cpt0.25"), "--fit", str(out / "fit.json")]) == 0
    rep = json.loads((cpt_runs_dir / "cpt0.25" / "forgetting.json").read_text())
    assert rep["predicted_end"]["spanish"] == pytest.approx(float(pred[-1]["loss_pred/spanish"]), rel=1e-9)
    assert "the fitted law" in capsys.readouterr().out


def test_cpt_suggest_meets_the_forgetting_budget(cpt_runs_dir, tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(["scaling", "fit", *_runs(cpt_runs_dir), "--law", "cpt", "--out", str(out), "--bootstrap", "3"]) == 0
    res = json.loads((out / "fit.json").read_text())
    assert len(res["domains"]["spanish"]["bootstrap"]) == 3 and "ci" in res["domains"]["austen"]
    capsys.readouterr()
    budget = 0.02
    assert main(["scaling", "suggest", "--cpt", str(out / "fit.json"), "--max-forgetting", str(budget),
                 "--tokens", "20480", "--out", str(tmp_path / "s.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    replay = float(lines[0].split(":")[1].split()[0])
    assert "schedule.kind=rewarm" in lines[1] and "train.max_tokens=20480" in lines[1]
    assert (tmp_path / "s.png").stat().st_size > 0
    # brute force over the same candidates: the printed choice is the best one that meets the budget
    cands = cpt_suggest.cpt_candidates(res, 20, 1024, cpt_suggest.REPLAYS)
    starts = {d: e["start_loss"] for d, e in res["domains"].items()}
    ok = [c for c in cands if c.end["austen"] <= (1 + budget) * starts["austen"]]
    best = max(ok, key=lambda c: starts["spanish"] - c.end["spanish"])
    assert replay == best.replay and f"{best.end['spanish']:.4f} at the end" in lines[3]


def test_dcpt_fit_and_suggest_on_runs(cpt_runs_dir, tmp_path, capsys):
    out = tmp_path / "dcpt"
    assert main(["scaling", "fit", *_runs(cpt_runs_dir), "--law", "dcpt", "--out", str(out)]) == 0
    res = json.loads((out / "fit.json").read_text())
    old, new = res["domains"]["austen"], res["domains"]["spanish"]
    assert old["role"] == "old" and sorted(set(old["points"]["r"])) == list(REPLAYS)
    assert sorted(set(new["points"]["r"])) == [0.5, 0.75, 1.0] and old["n_points"] == 30
    assert set(old["fixed"]) == {"a", "alpha"}, "one model size: its term is dropped"
    assert (out / "fit.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["scaling", "predict", "--fit", str(out / "fit.json"), "--n", str(old["n_range"][0]), "--d", "10240",
                 "--replay", "0.25"]) == 0
    assert "austen" in capsys.readouterr().out
    assert main(["scaling", "suggest", "--dcpt", str(out / "fit.json"), "--max-forgetting", "0.05", "--tokens", "10240"]) == 0
    assert capsys.readouterr().out.startswith("replay fraction: ")


@pytest.mark.parametrize("case, needle", [
    ("one_replay", "the fit saw one replay fraction"), ("dcpt_one_r", "the same mixture ratio"),
    ("budget", "--max-forgetting"), ("not_runs", "pass continual run directories")])
def test_cpt_bad_input_is_one_line_user_error(cpt_runs_dir, tmp_path, capsys, case, needle):
    if case == "one_replay":
        assert main(["scaling", "fit", str(cpt_runs_dir / "cpt0.25"), "--law", "cpt", "--out", str(tmp_path / "f")]) == 0
        (tmp_path / "s.csv").write_text("step,lr\n0,0\n10,0.001\n")
        argv = ["scaling", "predict", "--fit", str(tmp_path / "f" / "fit.json"), "--curve", str(tmp_path / "s.csv"),
                "--replay", "0.5", "--out", str(tmp_path / "p.csv")]
    elif case == "dcpt_one_r":
        argv = ["scaling", "fit", str(cpt_runs_dir / "cpt0.25"), "--law", "dcpt", "--out", str(tmp_path / "f")]
    elif case == "budget":
        argv = ["scaling", "suggest", "--cpt", "x.json", "--tokens", "1e6"]
    else:
        (tmp_path / "x.csv").write_text("step,lr,loss\n0,0,\n")
        argv = ["scaling", "fit", str(tmp_path / "x.csv"), "--law", "cpt", "--out", str(tmp_path / "f")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_replay_phases_are_refused(cpt_runs_dir, tmp_path):
    cfg = (cpt_runs_dir / "cpt0.25" / "config.yaml").read_text()
    target = tmp_path / "run"
    target.mkdir()
    (target / "metrics.jsonl").write_text((cpt_runs_dir / "cpt0.25" / "metrics.jsonl").read_text())
    (target / "config.yaml").write_text(cfg.replace("phases: []", "phases: [{until_tokens: 4096, replay_fraction: 0.5}]", 1))
    with pytest.raises(UserError, match="one replay ratio per run"):
        cpt_runs.read_run(target, None)
