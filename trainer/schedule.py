"""Learning rate as a pure function of tokens seen (plus a little resume state).

A schedule is a list of phases laid end to end over the run's tokens. Each phase moves the LR from
where the previous phase ended to its own end value along one shape (linear, cosine, 1-sqrt,
exponential, inverse-sqrt, constant, or the Power scheduler's power law). The named schedules
(`kind: cosine | linear | constant | wsd | infinite | rewarm | power`) are presets that expand to
phases, so the common YAML is a few keys, and `kind: phases` writes any sequence explicitly.
Resume semantics (horizon changes, rewarms, anneal branches) are documented in docs/schedules.md.
"""
import bisect
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Optional, get_args

from ..errors import UserError

Shape = Literal["constant", "linear", "cosine", "1-sqrt", "exponential", "inv-sqrt", "power"]
DecayShape = Literal["linear", "cosine", "1-sqrt", "exponential"]
SHAPES = get_args(Shape)
DECAY_SHAPES = get_args(DecayShape)
Kind = Literal["cosine", "linear", "constant", "wsd", "infinite", "rewarm", "power", "phases"]
KINDS = get_args(Kind)
_REL_TOL = 1e-9  # an LR this close to the checkpoint's counts as continuous (float round-off only)


@dataclass
class PhaseConfig:
    """One phase of `kind: phases`. Give at most one length; the one phase without fills the run."""
    shape: Shape = "constant"  # how the LR moves from the previous phase's end to `end`
    length_tokens: Optional[int] = None  # phase length in tokens ("10M" accepted)
    length_steps: Optional[int] = None  # phase length in optimizer steps (x train.global_batch_tokens)
    length_fraction: Optional[float] = None  # phase length as a fraction of the run's tokens
    end: Optional[float] = None  # LR at the phase end, as a fraction of `lr`; None: min_lr_ratio (constant: hold)
    start: Literal["previous", "zero", "resume"] = "previous"  # begin at the previous end, at 0, or at the checkpoint's LR
    name: str = ""  # label in describe() and plots; empty: the shape


@dataclass
class ScheduleConfig:
    """The LR schedule. `kind` picks a preset; only the keys that preset reads matter."""
    kind: Kind = "cosine"  # a preset, or `phases` for an explicit list
    lr: float = 3e-4  # peak LR; every ratio below is a fraction of it
    min_lr_ratio: float = 0.1  # floor: decays end at min_lr_ratio * lr (default: cosine to 10% of peak)
    warmup_tokens: int = 0  # linear warmup (or rewarm) length; >0 overrides warmup_fraction
    warmup_fraction: float = 0.01  # warmup length as a fraction of the run's tokens
    decay_tokens: int = 0  # wsd/power decay, infinite anneal length; >0 overrides decay_fraction
    decay_fraction: float = 0.2  # decay length as a fraction of the run (infinite: 0 = open-ended constant)
    decay_shape: Optional[DecayShape] = None  # None: the preset's own (wsd 1-sqrt, power/infinite exponential, rewarm cosine)
    cooldown_tokens: int = 0  # infinite: cooldown length from peak to constant_ratio; >0 overrides cooldown_fraction
    cooldown_fraction: float = 0.05  # infinite: cooldown length as a fraction of the run
    cooldown_shape: Literal["cosine", "inv-sqrt"] = "cosine"  # infinite: cooldown shape (Ibrahim et al. 2024)
    constant_ratio: float = 0.5  # infinite: LR of the constant phase as a fraction of `lr`
    inv_sqrt_alpha: float = 10.0  # steepness of the inv-sqrt shape: larger drops faster early
    rewarm_from: Literal["checkpoint", "zero"] = "checkpoint"  # rewarm: start at the checkpoint's LR or at 0
    resume_lr: Optional[float] = None  # rewarm from checkpoint: its LR when the loop cannot tell (e.g. HF weights)
    power_a: float = 4.6  # power: lr = min(lr, a * n^b), n = tokens (Shen et al. 2024, with muP)
    power_b: float = -0.51  # power: exponent b of the power law
    phases: list[PhaseConfig] = field(default_factory=list)  # kind=phases: the explicit sequence

    def __post_init__(self):
        _validate(self)


@dataclass(frozen=True)
class Segment:
    """A laid-out phase: absolute tokens [t0, t1), LRs at both ends. `coef` holds shape constants:
    power (a, b, cap, floor); inv-sqrt (alpha,)."""
    name: str
    shape: str
    t0: int
    t1: int
    lr0: float
    lr1: float
    coef: tuple = ()


# ---------------------------------------------------------------- shapes

def _power_lr(n: float, coef) -> float:
    """Shen et al. 2024: lr = min(lr_max, a * n^b), n in tokens; held at the floor like every decay."""
    a, b, cap, floor = coef
    return cap if n <= 0 else max(floor, min(cap, a * n ** b))


def _progress(shape: str, u: float, coef) -> float:
    """Fraction of the way from lr0 to lr1 after a fraction u of the phase."""
    if shape == "linear":
        return u
    if shape == "cosine":
        return (1 - math.cos(math.pi * u)) / 2
    if shape == "1-sqrt":  # lr = lr0 * (1 - sqrt(u)) when decaying to 0 (Hägele et al. 2024)
        return math.sqrt(u)
    # inv-sqrt: h(u) = 1/sqrt(1 + alpha*u) - 1 normalized to h(1) (Ibrahim et al. 2024 cooldown)
    (alpha,) = coef
    return (1 / math.sqrt(1 + alpha * u) - 1) / (1 / math.sqrt(1 + alpha) - 1)


def segment_lr(seg: Segment, t: float) -> float:
    if seg.shape == "power":
        return _power_lr(t, seg.coef)
    if seg.shape == "constant" or seg.t1 <= seg.t0:
        return seg.lr1
    u = min(1.0, max(0.0, (t - seg.t0) / (seg.t1 - seg.t0)))
    if seg.shape == "exponential":  # geometric interpolation: a constant ratio per token
        return seg.lr0 * (seg.lr1 / seg.lr0) ** u
    return seg.lr0 + (seg.lr1 - seg.lr0) * _progress(seg.shape, u, seg.coef)


def lr_at(segments: list, t: float, starts: Optional[list] = None) -> float:
    """LR of laid-out segments (sorted by t0) at token t: the last segment with t0 <= t gives it.
    Before the first it is the first's start; after the last, its end (an open-ended phase goes on)."""
    if t < segments[0].t0:
        return segments[0].lr0
    starts = starts or [s.t0 for s in segments]
    return segment_lr(segments[bisect.bisect_right(starts, t) - 1], t)


# ---------------------------------------------------------------- validation and presets

def _validate(cfg: ScheduleConfig) -> None:
    """Checks that need no horizon; run when the config is built (the YAML loader included)."""
    if cfg.kind not in KINDS:
        raise UserError(f"schedule.kind={cfg.kind!r} is unknown; use one of {', '.join(KINDS)}")
    if not cfg.lr > 0:
        raise UserError(f"schedule.lr={cfg.lr} must be positive; set the peak LR, e.g. 3e-4")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise UserError(f"schedule.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1] (a fraction of schedule.lr)")
    for key in ("warmup", "decay", "cooldown"):
        if getattr(cfg, f"{key}_tokens") < 0 or not 0 <= getattr(cfg, f"{key}_fraction") <= 1:
            raise UserError(f"schedule.{key}_tokens must be >= 0 and schedule.{key}_fraction in [0, 1]")
    if not cfg.min_lr_ratio <= cfg.constant_ratio <= 1:
        raise UserError(f"schedule.constant_ratio={cfg.constant_ratio} must lie between schedule.min_lr_ratio "
                        f"({cfg.min_lr_ratio}) and 1 (fractions of schedule.lr)")
    for key in ("inv_sqrt_alpha", "power_a"):
        if not getattr(cfg, key) > 0:
            raise UserError(f"schedule.{key}={getattr(cfg, key)} must be positive")
    if cfg.resume_lr is not None and not cfg.resume_lr >= 0:
        raise UserError(f"schedule.resume_lr={cfg.resume_lr} must be >= 0")
    if not cfg.power_b < 0:
        raise UserError(f"schedule.power_b={cfg.power_b} must be negative (the LR falls with tokens; paper: -0.51)")
    if cfg.decay_shape is not None and cfg.decay_shape not in DECAY_SHAPES:
        raise UserError(f"schedule.decay_shape={cfg.decay_shape!r} is unknown; use one of {', '.join(DECAY_SHAPES)}")
    if cfg.cooldown_shape not in ("cosine", "inv-sqrt"):
        raise UserError(f"schedule.cooldown_shape={cfg.cooldown_shape!r} is unknown; use cosine or inv-sqrt")
    if cfg.kind == "phases" and not cfg.phases:
        raise UserError("schedule.kind=phases needs a non-empty schedule.phases list")
    if cfg.kind != "phases" and cfg.phases:
        raise UserError(f"schedule.phases is only read with kind: phases (kind is {cfg.kind!r}); remove one of them")
    for i, p in enumerate(cfg.phases):
        key = f"schedule.phases[{i}]"
        if p.shape not in SHAPES:
            raise UserError(f"{key}.shape={p.shape!r} is unknown; use one of {', '.join(SHAPES)}")
        if p.start not in ("previous", "zero", "resume"):
            raise UserError(f"{key}.start={p.start!r} is unknown; use previous, zero or resume")
        given = [x for x in (p.length_tokens, p.length_steps, p.length_fraction) if x is not None]
        if len(given) > 1:
            raise UserError(f"{key}: give only one of length_tokens, length_steps, length_fraction")
        if given and not (given[0] >= 0 and (p.length_fraction or 0) <= 1):
            raise UserError(f"{key}: a length must be >= 0 (length_fraction in [0, 1])")
        if p.end is not None and not p.end >= 0:
            raise UserError(f"{key}.end={p.end} must be >= 0 (a fraction of schedule.lr)")
        if i and p.start == "resume":
            raise UserError(f"{key}.start=resume: only the first phase can start from the checkpoint's LR")


def _length(tokens: int, fraction: float) -> dict:
    return {"length_tokens": tokens} if tokens else {"length_fraction": fraction}


def _warmup(cfg: ScheduleConfig, name: str = "warmup", start: str = "previous") -> list:
    """Linear to the peak. Zero length is a jump to the peak (the next phase starts there)."""
    spec = _length(cfg.warmup_tokens, cfg.warmup_fraction)
    return [("schedule.warmup_tokens", PhaseConfig("linear", end=1.0, name=name, start=start, **spec))]


def _decay(cfg: ScheduleConfig, default_shape: str, name: str) -> list:
    """Decay to the floor; with zero length the phase before it is open-ended."""
    spec = _length(cfg.decay_tokens, cfg.decay_fraction)
    shape = cfg.decay_shape or default_shape
    return [("schedule.decay_shape", PhaseConfig(shape, end=cfg.min_lr_ratio, name=name, **spec))]


def expand(cfg: ScheduleConfig) -> list:
    """The preset as (config key for errors, PhaseConfig) pairs."""
    floor = cfg.min_lr_ratio
    if cfg.kind == "phases":
        return [(f"schedule.phases[{i}]", p) for i, p in enumerate(cfg.phases)]
    if cfg.kind in ("cosine", "linear"):
        return _warmup(cfg) + [("schedule.kind", PhaseConfig(cfg.kind, end=floor, name="decay"))]
    if cfg.kind == "constant":
        return _warmup(cfg) + [("schedule.kind", PhaseConfig("constant", end=1.0, name="constant"))]
    if cfg.kind == "wsd":  # MiniCPM (Hu et al. 2024): warmup, stable at peak, short decay
        return _warmup(cfg) + [("schedule.kind", PhaseConfig("constant", end=1.0, name="stable"))] \
            + _decay(cfg, "1-sqrt", "decay")
    if cfg.kind == "infinite":  # Ibrahim et al. 2024: warmup, cooldown, constant, anneal
        cool = _length(cfg.cooldown_tokens, cfg.cooldown_fraction)
        return _warmup(cfg) + [
            ("schedule.cooldown_shape", PhaseConfig(cfg.cooldown_shape, end=cfg.constant_ratio, name="cooldown", **cool)),
            ("schedule.constant_ratio", PhaseConfig("constant", end=cfg.constant_ratio, name="constant")),
        ] + _decay(cfg, "exponential", "anneal")
    if cfg.kind == "rewarm":  # Gupta et al. 2023: linear rewarm to the new peak, then cosine decay
        warm = _warmup(cfg, "rewarm", "resume" if cfg.rewarm_from == "checkpoint" else "zero")
        return warm + [("schedule.decay_shape", PhaseConfig(cfg.decay_shape or "cosine", end=floor, name="decay"))]
    # power (Shen et al. 2024): warmup to the power law's value, follow it, exponential decay at the end.
    return _warmup(cfg) + [("schedule.kind", PhaseConfig("power", name="power"))] + _decay(cfg, "exponential", "decay")


# ---------------------------------------------------------------- layout

def _resolve_lengths(phases: list, span: int, tokens_per_step: int) -> list:
    lengths, fill = [], []
    for i, (key, p) in enumerate(phases):
        if p.length_tokens is not None:
            lengths.append(p.length_tokens)
        elif p.length_steps is not None:
            lengths.append(p.length_steps * tokens_per_step)
        elif p.length_fraction is not None:
            lengths.append(round(p.length_fraction * span))
        else:
            lengths.append(0)
            fill.append(i)
    if len(fill) > 1:
        keys = " and ".join(phases[i][0] for i in fill)
        raise UserError(f"{keys} both have no length; give all phases but one a length (the one left fills the run)")
    used = sum(lengths)
    if used > span:
        raise UserError(f"schedule phases need {used:,} tokens but the run has {span:,} ({phases[-1][0]} and before); "
                        "shorten the phases or raise train.max_tokens")
    if fill:
        lengths[fill[0]] = span - used
    return lengths


def layout(cfg: ScheduleConfig, origin: int, total_tokens: int, tokens_per_step: int,
           resume_lr: Optional[float], bridge: Optional[tuple] = None) -> list:
    """Phases -> Segments over [origin, total_tokens]. `bridge` = (tokens, lr): the phase in progress
    at that token restarts its shape from that LR, reaching its planned end LR at its planned end."""
    phases = expand(cfg)
    lengths = _resolve_lengths(phases, total_tokens - origin, tokens_per_step)
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    power = (cfg.power_a, cfg.power_b, peak, floor)
    segments, t, prev = [], origin, 0.0
    for i, ((key, p), n) in enumerate(zip(phases, lengths)):
        if p.start == "zero":
            prev = 0.0
        elif p.start == "resume":
            prev = math.nan if resume_lr is None else resume_lr  # lr() explains a NaN
        coef = power if p.shape == "power" else (cfg.inv_sqrt_alpha,) if p.shape == "inv-sqrt" else ()
        end = peak * (cfg.min_lr_ratio if p.end is None else p.end)
        if p.shape == "constant":
            lr0 = lr1 = prev if p.end is None else end
        elif p.shape == "power":
            lr0, lr1 = _power_lr(t, power), _power_lr(t + n, power)
        else:
            lr0, lr1 = prev, end
        if p.shape != "constant" and i + 1 < len(phases) and phases[i + 1][1].shape == "power":
            # meet the power law where it takes over (Shen et al. 2024 warm up to its value)
            lr1 = _power_lr(t + n, power)
        if p.shape == "exponential" and n and not (lr0 > 0 and lr1 > 0) and not math.isnan(lr0):
            raise UserError(f"{key}: an exponential phase cannot start or end at LR 0; use a linear or cosine shape "
                            "or a positive end (schedule.min_lr_ratio > 0)")
        seg = Segment(p.name or p.shape, p.shape, t, t + n, lr0, lr1, coef)
        if bridge and t <= bridge[0] < t + n and p.shape != "power" and p.start == "previous":
            # The planned segment stays in the list (it still gives the LR before the resume point);
            # the tail starting at the resume point takes over after it (lookup takes the last t0 <= t).
            shape = "linear" if p.shape == "exponential" and not bridge[1] > 0 else p.shape  # no geometric step from 0
            tail = replace(seg, name=f"{seg.name} (resumed)", shape=shape, t0=bridge[0], lr0=bridge[1],
                           lr1=bridge[1] if p.shape == "constant" else lr1)
            segments += [seg, tail] if bridge[0] > t else [tail]
            lr1 = tail.lr1
        elif n:
            segments.append(seg)
        t, prev = t + n, lr1
    return segments


# ---------------------------------------------------------------- the schedule the loop uses

class Schedule:
    """LR as a function of tokens seen. Resume protocol for the loop: build_schedule(...), then
    load_state_dict(saved) if the checkpoint has one, then on_resume(tokens_seen, last_lr)."""

    def __init__(self, cfg: ScheduleConfig, total_tokens: int, tokens_per_step: int):
        if total_tokens <= 0 or tokens_per_step <= 0:
            raise UserError(f"schedule: train.max_tokens ({total_tokens}) and train.global_batch_tokens "
                            f"({tokens_per_step}) must be positive")
        self.cfg, self.total_tokens, self.tokens_per_step = cfg, total_tokens, tokens_per_step
        self.origin, self.resume_lr, self.bridge = 0, cfg.resume_lr, None
        self._saved: Optional[dict] = None
        self._relayout()

    def _relayout(self) -> None:
        if self.origin >= self.total_tokens:
            raise UserError(f"schedule: the run resumes at {self.origin:,} tokens, at or past train.max_tokens "
                            f"({self.total_tokens:,}); raise train.max_tokens")
        self.segments = layout(self.cfg, self.origin, self.total_tokens, self.tokens_per_step, self.resume_lr, self.bridge)
        if not self.segments:
            raise UserError("schedule: every phase has zero length; give the phases lengths (or leave one without, to fill the run)")
        self._starts = [s.t0 for s in self.segments]

    @property
    def rewarms(self) -> bool:
        """True when the first phase restarts the LR (rewarm): the phases then begin where the run resumes."""
        return expand(self.cfg)[0][1].start != "previous"

    def lr(self, tokens_seen: int) -> float:
        value = lr_at(self.segments, tokens_seen, self._starts)
        if math.isnan(value):
            raise UserError("schedule: rewarm_from=checkpoint needs the checkpoint's LR, and none is known; resume "
                            "from a cptrain checkpoint, or set schedule.resume_lr (or rewarm_from: zero)")
        return value

    def describe(self) -> list:
        """[(phase name, start_tokens, end_tokens, lr_start, lr_end)] for logs and plots."""
        out = []
        for s, nxt in zip(self.segments, self.segments[1:] + [None]):
            end = min(s.t1, nxt.t0) if nxt else s.t1  # a planned phase cut short by a resume
            out.append((s.name, s.t0, end, s.lr0, s.lr1 if end == s.t1 else segment_lr(s, end)))
        return out

    def _key(self) -> dict:
        return {"config": json.loads(json.dumps(asdict(self.cfg))), "total_tokens": self.total_tokens,
                "tokens_per_step": self.tokens_per_step}

    def state_dict(self) -> dict:
        """Plain data: what this schedule is (to tell a changed one at resume), where it is anchored,
        and its laid-out segments (to evaluate the old LR at the resume point)."""
        return {"version": 1, **self._key(), "origin": self.origin, "resume_lr": self.resume_lr,
                "bridge": list(self.bridge) if self.bridge else None,
                "segments": [list(asdict(s).values()) for s in self.segments]}

    def load_state_dict(self, d: dict) -> None:
        """Keep the saved state; an unchanged schedule (config, horizon, batch) is restored exactly."""
        self._saved = d
        if {k: d.get(k) for k in ("config", "total_tokens", "tokens_per_step")} == self._key():
            self.origin, self.resume_lr = d["origin"], d["resume_lr"]
            self.bridge = tuple(d["bridge"]) if d["bridge"] else None
            self._relayout()

    def saved_lr(self, tokens_seen: int) -> Optional[float]:
        """The LR the saved (checkpoint's) schedule gives at tokens_seen; None without saved state."""
        if not self._saved:
            return None
        old = [Segment(n, sh, t0, t1, a, b, tuple(c)) for n, sh, t0, t1, a, b, c in self._saved["segments"]]
        return lr_at(old, tokens_seen)

    def on_resume(self, tokens_seen: int, last_lr: Optional[float] = None) -> None:
        """Call after load_state_dict (or, for a new run from a checkpoint, with that checkpoint's LR).
        last_lr: the LR of the checkpoint's last step; None = the saved schedule's LR at tokens_seen.
        - Same schedule as saved: nothing changes (exact resume).
        - A rewarm schedule (first phase starts at `resume` or `zero`) new to this run: its phases
          begin at tokens_seen, warming from last_lr (or 0).
        - Otherwise, with saved state: the phase in progress is re-planned from last_lr, so the LR
          is continuous (a longer horizon stretches the rest of the decay)."""
        if self._saved and {k: self._saved.get(k) for k in ("config", "total_tokens", "tokens_per_step")} == self._key():
            return
        old_lr = last_lr if last_lr is not None else self.saved_lr(tokens_seen)
        same_config = bool(self._saved) and self._saved.get("config") == self._key()["config"]
        if same_config:  # only the horizon or batch changed: keep the anchor of the saved run
            self.origin, self.resume_lr = self._saved["origin"], self._saved["resume_lr"]
        elif self.rewarms:
            self.origin, self.bridge = tokens_seen, None
            if old_lr is not None:
                self.resume_lr = old_lr
            return self._relayout()
        if not self._saved or old_lr is None:
            return  # a new run: its schedule starts from the beginning
        self.bridge = None
        self._relayout()
        if abs(self.lr(tokens_seen) - old_lr) > _REL_TOL * max(abs(old_lr), 1e-30):
            self.bridge = (tokens_seen, old_lr)
            self._relayout()


def build_schedule(cfg: ScheduleConfig, total_tokens: int, tokens_per_step: int) -> Schedule:
    """The schedule of a run of `total_tokens` with `tokens_per_step` tokens per optimizer step."""
    return Schedule(cfg, total_tokens, tokens_per_step)


def anneal_branch(cfg: ScheduleConfig, at_tokens: int, anneal_tokens: int, shape: str = "linear", *,
                  total_tokens: int, tokens_per_step: int) -> ScheduleConfig:
    """Schedule of a branch run that resumes a checkpoint taken at `at_tokens` inside a constant
    phase (WSD stable, infinite constant) or a power phase of `cfg` (laid out over `total_tokens`),
    and anneals to the floor over `anneal_tokens`. Its phases are the parent's up to `at_tokens`, so
    the LR is continuous at the branch point; the branch run's train.max_tokens is
    at_tokens + anneal_tokens (Hu et al. 2024; Ibrahim et al. 2024)."""
    if shape not in DECAY_SHAPES:
        raise UserError(f"anneal shape {shape!r} is unknown; use one of {', '.join(DECAY_SHAPES)}")
    if anneal_tokens <= 0:
        raise UserError(f"anneal tokens must be positive, got {anneal_tokens}")
    parent = build_schedule(cfg, total_tokens, tokens_per_step)
    if parent.rewarms:
        raise UserError("schedule: anneal branches start from wsd, infinite, power or phases schedules, not a rewarm")
    held = [s for s in parent.segments if s.shape in ("constant", "power") and s.t0 <= at_tokens < s.t1]
    if not held:
        spans = ", ".join(f"{s.name} [{s.t0:,}, {s.t1:,})" for s in parent.segments if s.shape in ("constant", "power"))
        raise UserError(f"anneal branch at {at_tokens:,} tokens is not in a constant or power phase; "
                        f"pick a checkpoint in {spans or 'one (this schedule has none)'}")
    phases = []
    for s in parent.segments:
        if s.t0 >= at_tokens:
            break
        if s.t1 > s.t0:
            phases.append(PhaseConfig(s.shape, length_tokens=min(s.t1, at_tokens) - s.t0, end=s.lr1 / cfg.lr, name=s.name))
    phases.append(PhaseConfig(shape, length_tokens=anneal_tokens, end=cfg.min_lr_ratio, name="anneal"))
    return replace(cfg, kind="phases", phases=phases)
