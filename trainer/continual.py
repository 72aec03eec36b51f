"""Continual pretraining in the loop: which validation domains are old (forgetting) and new
(adaptation), and the forgetting report written at the end of a continual run
(trainer/analysis/forgetting.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import UserError


@dataclass
class ContinualSection:
    old_domains: list[str] = field(default_factory=list)  # validation domains that measure forgetting; empty: replay + val_domains
    new_domains: list[str] = field(default_factory=list)  # validation domains that measure adaptation; empty: data.domains
    report: Literal["auto", "on", "off"] = "auto"  # forgetting report at the end: auto = when model.init_from is set

    def check(self, data, src: str) -> None:
        """Names must be validation domains of `data` (a DataConfig): training, replay or val_domains."""
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
