"""Continual pretraining in the loop: which validation domains are old (forgetting) and new
(adaptation), the forgetting report written at the end of a continual run
(trainer/analysis/forgetting.py), and the settings of meta-experience replay (trainer/mer.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..errors import UserError


@dataclass
class MERSection:
    """Meta-experience replay (Abbes et al. 2025; trainer/mer.py): every `interval` optimizer steps,
    theta <- theta_anchor + strength * (theta - theta_anchor), then the anchor is reset to theta."""
    interval: int = 0  # optimizer steps between interpolations (their k; their code's default 500); 0: off
    strength: Optional[float] = None  # in (0, 1]: the share of the last `interval` steps' move kept (their code's default 0.01)

    def check(self, src: str) -> None:
        if self.interval < 0:
            raise UserError(f"{src}: continual.mer.interval={self.interval} must be >= 0 (0 turns meta-experience replay off)")
        if self.interval and (self.strength is None or not 0 < self.strength <= 1):
            raise UserError(f"{src}: continual.mer.strength={self.strength} must be in (0, 1] with continual.mer.interval > 0 "
                            "(the share of each interval's move kept; e.g. 0.5)")


@dataclass
class ContinualSection:
    old_domains: list[str] = field(default_factory=list)  # validation domains that measure forgetting; empty: replay + val_domains
    new_domains: list[str] = field(default_factory=list)  # validation domains that measure adaptation; empty: data.domains
    report: Literal["auto", "on", "off"] = "auto"  # forgetting report at the end: auto = when model.init_from is set
    mer: MERSection = field(default_factory=MERSection)  # meta-experience replay (trainer/mer.py); off by default

    def check(self, data, src: str) -> None:
        """Names must be validation domains of `data` (a DataConfig): training, replay or val_domains."""
        self.mer.check(src)
        known = [d.name for d in [*data.domains, *data.replay, *data.val_domains]]
        for key in ("old_domains", "new_domains"):
            unknown = [n for n in getattr(self, key) if n not in known]
            if unknown:
                raise UserError(f"{src}: continual.{key} names {unknown}, which are not validation domains; use some of {known}")


def split_domains(cfg) -> tuple[list[str], list[str]]:
    """(old, new) validation domain names of a TrainConfig: as configured, else old = replay and
    val_domains (the data continual pretraining must not forget), new = the training domains."""
    train = [d.name for d in cfg.data.domains]
    old = cfg.continual.old_domains or [d.name for d in [*cfg.data.replay, *cfg.data.val_domains] if d.name not in train]
    new = cfg.continual.new_domains or [n for n in train if n not in old]
    return list(dict.fromkeys(old)), list(dict.fromkeys(new))


def at_end_of_run(cfg, run_dir: Path, say) -> None:
    """The loop's hook after the last step: the report when `continual.report` asks for it."""
    from .analysis.forgetting import format_forgetting, write_forgetting

    wanted = cfg.continual.report == "on" or (cfg.continual.report == "auto" and cfg.model.init_from)
    if not wanted:
        return
    old, new = split_domains(cfg)
    if not old and not new:
        say("continual: no old/new domains to report on (set continual.old_domains or data.replay); no forgetting report")
        return
    rep = write_forgetting(run_dir, old, new, {t.stem: t.role for t in cfg.eval.tasks})
    say("\n" + format_forgetting(rep, str(run_dir)) + f"wrote {run_dir / 'forgetting.md'}, .json and .png")
