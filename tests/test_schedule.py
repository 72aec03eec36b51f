"""LR schedules: exact values at phase boundaries, monotonicity, resume semantics, anneal branches,
and config errors. Numbers are worked out by hand from the formulas in docs/schedules.md."""
import argparse
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cptrain.errors import UserError
from cptrain.trainer.schedule import PhaseConfig, ScheduleConfig, anneal_branch, build_schedule

pytestmark = pytest.mark.schedules
approx = lambda x: pytest.approx(x, rel=1e-12, abs=1e-15)  # noqa: E731


def lrs(schedule, tokens):
    return [schedule.lr(t) for t in tokens]


def resumed(cfg, total, tps, saved_from, at, last_lr=None):
    """A schedule built from `cfg` that resumes the state of `saved_from` at `at` tokens."""
    state = json.loads(json.dumps(saved_from.state_dict()))  # what a checkpoint stores
    s = build_schedule(cfg, total, tps)
    s.load_state_dict(state)
    s.on_resume(at, last_lr)
    return s


# ---------------------------------------------------------------- values at phase boundaries

def test_default_is_one_percent_warmup_then_cosine_to_ten_percent():
    s = build_schedule(ScheduleConfig(), 1_000_000, 1000)
    assert [p[:3] for p in s.describe()] == [("warmup", 0, 10_000), ("decay", 10_000, 1_000_000)]
    assert lrs(s, [0, 5_000, 10_000, 505_000, 1_000_000, 2_000_000]) == [
        0.0, approx(1.5e-4), approx(3e-4), approx(3e-5 + 2.7e-4 / 2), approx(3e-5), approx(3e-5)]


@pytest.mark.parametrize("shape,mid", [
    ("linear", 0.55), ("cosine", 0.55), ("1-sqrt", 1 - 0.9 * math.sqrt(0.5)), ("exponential", math.sqrt(0.1))])
def test_wsd_boundaries_and_decay_shapes(shape, mid):
    cfg = ScheduleConfig(kind="wsd", lr=1.0, warmup_tokens=100, decay_fraction=0.2, decay_shape=shape)
    s = build_schedule(cfg, 1000, 10)
    assert [p[:3] for p in s.describe()] == [("warmup", 0, 100), ("stable", 100, 800), ("decay", 800, 1000)]
    assert lrs(s, [0, 50, 100, 450, 800, 900, 1000]) == [0, 0.5, 1, 1, 1, approx(mid), approx(0.1)]


def test_wsd_default_decay_is_one_minus_sqrt_and_decay_tokens_override_fraction():
    s = build_schedule(ScheduleConfig(kind="wsd", lr=1.0, warmup_tokens=100, decay_tokens=400), 1000, 10)
    assert s.describe()[-1][1:3] == (600, 1000)
    assert s.lr(700) == approx(1 - 0.9 * math.sqrt(0.25))


@pytest.mark.parametrize("shape,mid", [
    ("cosine", 0.75), ("inv-sqrt", 1 - 0.5 * (1 / math.sqrt(6) - 1) / (1 / math.sqrt(11) - 1))])
def test_infinite_boundaries(shape, mid):
    cfg = ScheduleConfig(kind="infinite", lr=1.0, warmup_tokens=100, cooldown_tokens=200, cooldown_shape=shape,
                         constant_ratio=0.5, decay_tokens=100)
    s = build_schedule(cfg, 1000, 10)
    assert [p[0] for p in s.describe()] == ["warmup", "cooldown", "constant", "anneal"]
    assert [p[1] for p in s.describe()] == [0, 100, 300, 900]
    assert lrs(s, [100, 200, 300, 600, 900, 950, 1000]) == [
        1, approx(mid), approx(0.5), approx(0.5), approx(0.5), approx(0.5 * math.sqrt(0.2)), approx(0.1)]


def test_infinite_linear_anneal_and_open_ended_constant():
    base = dict(kind="infinite", lr=1.0, warmup_tokens=100, cooldown_tokens=200, constant_ratio=0.5)
    s = build_schedule(ScheduleConfig(**base, decay_tokens=100, decay_shape="linear"), 1000, 10)
    assert s.lr(950) == approx(0.3)
    s = build_schedule(ScheduleConfig(**base, decay_fraction=0.0), 1000, 10)
    assert s.describe()[-1][:3] == ("constant", 300, 1000)
    assert lrs(s, [1000, 10**9]) == [0.5, 0.5]  # the constant phase runs past any horizon


def test_power_scheduler_formula():
    cap, a, b = 1e-3, 4.6, -0.51
    cfg = ScheduleConfig(kind="power", lr=cap, warmup_tokens=10**6, decay_fraction=0.1)
    s = build_schedule(cfg, 10**9, 10**5)
    assert [p[:3] for p in s.describe()] == [("warmup", 0, 10**6), ("power", 10**6, 9 * 10**8),
                                            ("decay", 9 * 10**8, 10**9)]
    assert a * (10**6) ** b > cap  # early on the cap binds ...
    assert lrs(s, [0, 5 * 10**5, 10**6]) == [0, approx(cap / 2), approx(cap)]
    assert s.lr(10**8) == approx(a * (10**8) ** b)  # ... later the power law: 3.8e-4
    knee = (cap / a) ** (1 / b)
    assert s.lr(knee * 0.99) == cap and s.lr(knee * 1.01) < cap
    start = a * (9e8) ** b
    assert s.lr(9 * 10**8) == approx(start)
    assert s.lr(int(9.5e8)) == approx(start * math.sqrt(1e-4 / start))  # exponential to min_lr = 1e-4
    assert s.lr(10**9) == approx(1e-4)


def test_power_warmup_meets_the_power_law_when_it_is_below_the_cap():
    s = build_schedule(ScheduleConfig(kind="power", lr=1e-3, warmup_tokens=10**8, decay_fraction=0.1), 10**9, 10**5)
    assert s.lr(10**8) == approx(4.6 * (10**8) ** -0.51)
    assert s.lr(5 * 10**7) == approx(4.6 * (10**8) ** -0.51 / 2)


@pytest.mark.parametrize("kind,tail", [("linear", 0.55), ("constant", 1.0)])
def test_linear_and_constant_presets(kind, tail):
    s = build_schedule(ScheduleConfig(kind=kind, lr=1.0, warmup_tokens=100), 1100, 10)
    assert lrs(s, [0, 100, 600, 1100]) == [0, 1, approx(tail), approx(0.1 if kind == "linear" else 1.0)]


def test_zero_warmup_starts_at_the_peak():
    s = build_schedule(ScheduleConfig(lr=1.0, warmup_fraction=0.0), 1000, 10)
    assert s.describe() == [("decay", 0, 1000, 1.0, 0.1)]
    r = build_schedule(ScheduleConfig(kind="rewarm", lr=1.0, warmup_tokens=0, warmup_fraction=0.0), 1000, 10)
    assert lrs(r, [0, 500, 1000]) == [1.0, approx(0.55), approx(0.1)]  # a rewarm of zero length is a jump


def test_explicit_phases_in_steps_tokens_and_fractions():
    cfg = ScheduleConfig(kind="phases", lr=2.0, phases=[
        PhaseConfig("linear", length_steps=10, end=1.0),
        PhaseConfig("constant", length_tokens=1000, name="hold"),
        PhaseConfig("cosine", end=0.0),
        PhaseConfig("linear", length_fraction=0.1, end=0.25, start="zero", name="tail")])
    s = build_schedule(cfg, 10_000, 100)
    assert s.describe() == [("linear", 0, 1000, 0.0, 2.0), ("hold", 1000, 2000, 2.0, 2.0),
                            ("cosine", 2000, 9000, 2.0, 0.0), ("tail", 9000, 10_000, 0.0, 0.5)]
    assert lrs(s, [500, 1500, 5500, 9500]) == [1.0, 2.0, approx(1.0), approx(0.25)]


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["cosine", "linear", "wsd", "infinite", "power"]),
       shape=st.sampled_from(["linear", "cosine", "1-sqrt", "exponential"]),
       warmup=st.floats(0.001, 0.2), decay=st.one_of(st.just(0.0), st.floats(0.01, 0.5)), total=st.integers(10_000, 10**10))
def test_warmup_rises_then_lr_never_rises(kind, shape, warmup, decay, total):
    cfg = ScheduleConfig(kind=kind, lr=1e-3, warmup_fraction=warmup, decay_fraction=decay, decay_shape=shape,
                         cooldown_fraction=0.1)
    s = build_schedule(cfg, total, 1)
    w = s.describe()[0][2]
    up = lrs(s, [round(w * i / 50) for i in range(51)])
    down = lrs(s, [w + round((total - w) * i / 200) for i in range(201)])
    assert all(b >= a for a, b in zip(up, up[1:]))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(down, down[1:]))
    assert 0 <= min(up + down) and max(up + down) <= 1e-3 * (1 + 1e-12)
    open_ended = {"wsd": 1e-3, "infinite": 5e-4, "power": s.describe()[-1][4]}  # decay 0: the held phase goes on
    assert down[-1] == approx(1e-4 if decay or kind in ("cosine", "linear") else open_ended[kind])


# ---------------------------------------------------------------- resume

def test_unchanged_schedule_resumes_exactly():
    cfg = ScheduleConfig(kind="wsd", lr=1.0, warmup_tokens=100)
    s = build_schedule(cfg, 1000, 10)
    r = resumed(cfg, 1000, 10, s, 500)
    assert r.describe() == s.describe()
    assert lrs(r, range(0, 1001, 7)) == lrs(s, range(0, 1001, 7))


def test_cosine_horizon_extended_at_resume_is_continuous_and_reaches_the_floor():
    cfg = ScheduleConfig(lr=1.0, warmup_tokens=100)
    old = build_schedule(cfg, 1000, 10)
    at = 500
    lr_at = old.lr(at)
    assert lr_at == approx(0.1 + 0.9 * (1 + math.cos(math.pi * 400 / 900)) / 2)
    new = resumed(cfg, 2000, 10, old, at)
    assert new.lr(at) == approx(lr_at)
    assert new.lr(1250) == approx((lr_at + 0.1) / 2)  # the rest of the cosine restarts from lr_at ...
    assert new.lr(2000) == approx(0.1)  # ... and reaches the floor at the new horizon
    after = lrs(new, range(at, 2001, 10))
    assert all(b <= a for a, b in zip(after, after[1:]))
    assert lrs(new, [0, 100, 300]) == lrs(build_schedule(cfg, 2000, 10), [0, 100, 300])  # before: the new plan
    again = resumed(cfg, 2000, 10, new, 1500)  # a crash-resume of the extended run changes nothing
    assert lrs(again, range(0, 2001, 13)) == lrs(new, range(0, 2001, 13))
    explicit = resumed(cfg, 2000, 10, old, at, last_lr=lr_at)
    assert explicit.describe() == new.describe()


def test_horizon_shortened_at_resume_is_continuous():
    cfg = ScheduleConfig(lr=1.0, warmup_tokens=100)
    old = build_schedule(cfg, 2000, 10)
    new = resumed(cfg, 1000, 10, old, 500)
    assert new.lr(500) == approx(old.lr(500)) and new.lr(1000) == approx(0.1)


def test_infinite_constant_extended_needs_no_bridge():
    cfg = ScheduleConfig(kind="infinite", lr=1.0, warmup_tokens=100, cooldown_tokens=200, constant_ratio=0.5,
                         decay_tokens=100)
    old = build_schedule(cfg, 1000, 10)
    new = resumed(cfg, 5000, 10, old, 700)
    assert not any("resumed" in p[0] for p in new.describe())
    assert lrs(new, [0, 200, 700, 4900, 5000]) == lrs(old, [0, 200]) + [approx(0.5)] * 2 + [approx(0.1)]
    assert new.describe()[-1][:3] == ("anneal", 4900, 5000)


def test_rewarm_from_the_checkpoint_lr_at_resume():
    pre = build_schedule(ScheduleConfig(lr=1.0, warmup_tokens=100), 1000, 10)  # ends at 0.1
    cfg = ScheduleConfig(kind="rewarm", lr=0.5, warmup_tokens=100)
    s = resumed(cfg, 2000, 10, pre, 1000)
    assert [p[:3] for p in s.describe()] == [("rewarm", 1000, 1100), ("decay", 1100, 2000)]
    assert lrs(s, [1000, 1050, 1100, 1550, 2000]) == [
        approx(0.1), approx(0.3), approx(0.5), approx(0.05 + 0.45 / 2), approx(0.05)]
    again = resumed(cfg, 2000, 10, s, 1500)  # crash-resume: no second rewarm
    assert lrs(again, range(1000, 2001, 11)) == lrs(s, range(1000, 2001, 11))
    longer = resumed(cfg, 3000, 10, s, 1500)  # longer horizon: same anchor, continuous
    assert longer.describe()[0][:3] == ("rewarm", 1000, 1100)
    assert longer.lr(1500) == approx(s.lr(1500)) and longer.lr(3000) == approx(0.05)


def test_rewarm_from_zero_at_resume():
    pre = build_schedule(ScheduleConfig(lr=1.0, warmup_tokens=100), 1000, 10)
    s = resumed(ScheduleConfig(kind="rewarm", rewarm_from="zero", lr=0.5, warmup_tokens=100), 2000, 10, pre, 1000)
    assert lrs(s, [1000, 1050, 1100, 2000]) == [0, approx(0.25), approx(0.5), approx(0.05)]


def test_rewarm_of_a_new_run_from_a_checkpoint():
    cfg = ScheduleConfig(kind="rewarm", lr=1e-3, warmup_tokens=1000)
    s = build_schedule(cfg, 10_000, 100)
    with pytest.raises(UserError, match="schedule.resume_lr"):
        s.lr(0)
    s.on_resume(0, 3e-5)  # the loop passes the source checkpoint's LR
    assert lrs(s, [0, 500, 1000]) == [approx(3e-5), approx((3e-5 + 1e-3) / 2), approx(1e-3)]
    t = build_schedule(ScheduleConfig(kind="rewarm", lr=1e-3, warmup_tokens=1000, resume_lr=3e-5), 10_000, 100)
    assert t.describe() == s.describe()


def test_continual_run_with_a_new_cosine_is_not_bridged():
    """A new run (no saved schedule state) starts its schedule from the beginning, whatever the LR it came from."""
    s = build_schedule(ScheduleConfig(lr=1.0, warmup_tokens=100), 1000, 10)
    s.on_resume(0, 0.1)
    assert s.lr(0) == 0 and s.lr(100) == 1.0


# ---------------------------------------------------------------- anneal branches

def test_anneal_branch_of_wsd():
    cfg = ScheduleConfig(kind="wsd", lr=1.0, warmup_tokens=100, decay_fraction=0.2)
    parent = build_schedule(cfg, 1000, 10)
    branch_cfg = anneal_branch(cfg, 400, 100, "linear", total_tokens=1000, tokens_per_step=10)
    branch = resumed(branch_cfg, 500, 10, parent, 400)
    assert lrs(branch, range(0, 401, 10)) == lrs(parent, range(0, 401, 10))
    assert not any("resumed" in p[0] for p in branch.describe())
    assert lrs(branch, [400, 450, 500]) == [1.0, approx(0.55), approx(0.1)]


def test_anneal_branch_of_infinite_constant_is_exponential_to_the_floor():
    cfg = ScheduleConfig(kind="infinite", lr=1.0, warmup_tokens=100, cooldown_tokens=200, constant_ratio=0.5,
                         decay_fraction=0.0)
    parent = build_schedule(cfg, 10_000, 10)
    branch = resumed(anneal_branch(cfg, 5000, 1000, "exponential", total_tokens=10_000, tokens_per_step=10),
                     6000, 10, parent, 5000)
    assert lrs(branch, [200, 5000, 5500, 6000]) == [
        approx(parent.lr(200)), approx(0.5), approx(0.5 * math.sqrt(0.2)), approx(0.1)]


def test_anneal_branch_outside_a_constant_phase_is_refused():
    cfg = ScheduleConfig(kind="wsd", lr=1.0, warmup_tokens=100)
    with pytest.raises(UserError, match=r"stable \[100, 800\)"):
        anneal_branch(cfg, 50, 100, "linear", total_tokens=1000, tokens_per_step=10)
    with pytest.raises(UserError, match="anneal shape"):
        anneal_branch(cfg, 500, 100, "wiggle", total_tokens=1000, tokens_per_step=10)


# ---------------------------------------------------------------- bad configs

@pytest.mark.parametrize("kwargs,needle", [
    (dict(lr=-1e-3), "schedule.lr"),
    (dict(min_lr_ratio=1.5), "schedule.min_lr_ratio"),
    (dict(kind="wsd", decay_shape="zigzag"), "schedule.decay_shape"),
    (dict(kind="phases", phases=[PhaseConfig("zigzag")]), "schedule.phases[0].shape"),
    (dict(kind="phases", phases=[PhaseConfig("linear", end=-1.0)]), "schedule.phases[0].end"),
    (dict(kind="phases", phases=[PhaseConfig("linear", length_tokens=5, length_steps=5)]), "only one of"),
    (dict(kind="phases", phases=[PhaseConfig("linear", end=1.0), PhaseConfig("linear", start="resume")]),
     "schedule.phases[1].start"),
    (dict(kind="phases"), "non-empty schedule.phases"),
    (dict(phases=[PhaseConfig()]), "only read with kind: phases"),
    (dict(power_b=0.5), "schedule.power_b"),
    (dict(kind="infinite", constant_ratio=0.05), "schedule.constant_ratio"),
])
def test_bad_configs_name_the_key(kwargs, needle):
    with pytest.raises(UserError) as e:
        ScheduleConfig(**kwargs)
    assert needle in str(e.value)


@pytest.mark.parametrize("cfg,needle", [
    (ScheduleConfig(kind="phases", phases=[PhaseConfig("linear", length_tokens=2000, end=1.0)]), "need 2,000 tokens"),
    (ScheduleConfig(kind="wsd", warmup_tokens=900, decay_tokens=200), "raise train.max_tokens"),
    (ScheduleConfig(kind="phases", phases=[PhaseConfig("linear", end=1.0), PhaseConfig("cosine")]), "both have no length"),
    (ScheduleConfig(kind="wsd", decay_shape="exponential", min_lr_ratio=0.0), "schedule.decay_shape: an exponential"),
    (ScheduleConfig(kind="phases", phases=[PhaseConfig("linear", length_fraction=1e-9)]), "zero length"),
])
def test_phases_that_do_not_fit_are_refused(cfg, needle):
    with pytest.raises(UserError) as e:
        build_schedule(cfg, 1000, 10)
    assert needle in str(e.value)


def test_nonpositive_horizon_is_refused():
    with pytest.raises(UserError, match="train.max_tokens"):
        build_schedule(ScheduleConfig(), 0, 10)


# ---------------------------------------------------------------- plots and the YAML loader

@pytest.mark.parametrize("cfg", [ScheduleConfig(), ScheduleConfig(kind="rewarm", warmup_tokens=100),
                                 ScheduleConfig(kind="power", lr=1e-3)])
def test_plot_schedule_writes_a_png(tmp_path, cfg):
    from cptrain.trainer.analysis.report import plot_schedule

    s = build_schedule(cfg, 10**9, 10**5)
    before = s.describe()
    path = plot_schedule(s, tmp_path / "lr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert s.describe() == before  # plotting does not touch the schedule


def test_yaml_config_and_cli_plot(tmp_path, capsys):
    from cptrain.trainer import config
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  seq_len: 256\ntrain:\n  max_tokens: 10M\n  global_batch_tokens: 65536\n"
                 "schedule:\n  kind: wsd\n  lr: 1e-3\n  warmup_tokens: 100K\n  decay_shape: cosine\n")
    cfg = config.load_config(str(p))
    assert cfg.schedule == ScheduleConfig(kind="wsd", lr=1e-3, warmup_tokens=100_000, decay_shape="cosine")
    from cptrain.launch.commands import schedule_plot as cli_plot

    assert cli_plot(argparse.Namespace(config=str(p), out=str(tmp_path / "s.png"), overrides=[])) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert "stable" in capsys.readouterr().out
    p.write_text("schedule:\n  kind: wsd\n  decay_shape: zigzag\n")
    with pytest.raises(UserError, match="schedule.decay_shape"):
        config.load_config(str(p))
    branch = anneal_branch(cfg.schedule, 5_000_000, 1_000_000, "cosine", total_tokens=10_000_000, tokens_per_step=65536)
    assert config.from_dict(ScheduleConfig, config.to_dict(branch), "schedule") == branch  # resolved configs reload


def test_every_yaml_example_in_the_docs_builds():
    from cptrain.trainer import config
    import pathlib
    import re

    import yaml

    text = (pathlib.Path(__file__).parents[1] / "docs" / "schedules.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert len(blocks) >= 6
    for block in blocks:
        cfg = config.from_dict(ScheduleConfig, yaml.safe_load(block)["schedule"], "schedule")
        s = build_schedule(cfg, 100 * 10**9, 4 * 2**20)
        s.on_resume(0, 1e-5)  # a rewarm from a checkpoint needs its LR
        assert all(0 <= s.lr(t) <= cfg.lr for t in range(0, 100 * 10**9 + 1, 10**9))
