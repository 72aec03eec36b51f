"""Experiment trackers beside TensorBoard: Weights & Biases (`log.wandb`) and MLflow (`log.mlflow`).

On rank 0 each tracker gets every metrics.jsonl row at its step, the resolved config (RUN_DIR/config.yaml)
as the run's config or params, and at the end of the run the reports and plots in the run directory
as artifacts. The tracker run's id is kept in RUN_DIR/trackers.json: a resumed run continues the same
tracker run, a new run directory starts a new one.

Steps only go forward in a tracker: rows at steps it already holds are not sent again. After a resume
(or a rollback) the loop logs again the steps between the checkpoint and the point where the earlier
process stopped (their first rows are in metrics.dropped.jsonl); W&B ignores such steps (it takes
only increasing steps, and rewinding a run is a preview feature of its server), and MLflow would keep
two values at one step. Both keep the values first logged there, and continue where they stopped.
The packages are imported only when a tracker is on (`pip install` the `wandb` or `mlflow` extra).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from ..errors import UserError

STATE = "trackers.json"  # {"wandb": run id, "mlflow": run id}
ARTIFACTS = ("config.yaml", "*.md", "*.png", "*.json")  # what a run directory holds at the end, besides checkpoints


@dataclass
class WandbSection:
    project: str = ""  # W&B project; setting it turns W&B on (needs the `wandb` extra)
    entity: str = ""  # team or user; empty: the logged-in user's default
    mode: Literal["auto", "online", "offline"] = "auto"  # auto: W&B's own setting (WANDB_MODE), online by default; offline: `wandb sync` later
    tags: list[str] = field(default_factory=list)


@dataclass
class MlflowSection:
    experiment: str = ""  # MLflow experiment (created if absent); setting it turns MLflow on (needs the `mlflow` extra)
    tracking_uri: str = ""  # http(s)://server, or sqlite:///PATH/mlflow.db for a local store; empty: MLFLOW_TRACKING_URI or MLflow's default
    artifact_location: str = ""  # where a new experiment keeps artifacts; empty: MLflow's default (the server's, else ./mlruns)


def check(wandb: WandbSection, mlflow: MlflowSection, src: str) -> None:
    """At config load: a tracker's keys need the key that turns it on, and its packages installed."""
    if (wandb.entity or wandb.tags or wandb.mode != "auto") and not wandb.project:
        raise UserError(f"{src}: log.wandb needs log.wandb.project to turn W&B on; set it or remove log.wandb")
    if (mlflow.tracking_uri or mlflow.artifact_location) and not mlflow.experiment:
        raise UserError(f"{src}: log.mlflow needs log.mlflow.experiment to turn MLflow on; set it or remove log.mlflow")
    if wandb.project:
        _require("wandb", "wandb", "log.wandb", src)
    if mlflow.experiment:
        _require("mlflow", "mlflow", "log.mlflow", src)
        uri = mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        scheme = uri.partition("://")[0] if "://" in uri else "databricks" if uri.startswith("databricks") else ""
        if scheme == "sqlite" or not uri:  # MLflow's default store is ./mlflow.db
            for module in ("sqlalchemy", "alembic"):
                _require(module, "mlflow", "log.mlflow (a sqlite store)", src)
        elif scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
            raise UserError(f"{src}: log.mlflow.tracking_uri={uri!r} is a file store, which MLflow 3 refuses unless "
                            "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///PATH/mlflow.db (a local store) or set that variable")


def _require(module: str, extra: str, key: str, src: str) -> None:
    # Found, not imported: every config load on every rank comes here (importing mlflow alone takes ~2 s);
    # rank 0 imports the trackers when it opens them. A None in sys.modules blocks an import, as Python's own.
    found = sys.modules[module] is not None if module in sys.modules else importlib.util.find_spec(module) is not None
    if not found:
        raise UserError(f"{src}: {key} needs the {module} package, which is not installed; "
                        f"pip install {' '.join(_extra_requirements(extra))}") from None


def _extra_requirements(extra: str) -> list[str]:
    """The pinned requirements of one of cptrain's extras (from the installed metadata: one list, pyproject.toml's)."""
    try:
        reqs = importlib.metadata.requires("cptrain") or []
    except importlib.metadata.PackageNotFoundError:
        reqs = []
    pins = [r.split(";")[0].replace(" ", "") for r in reqs if f'extra == "{extra}"' in r]
    return [f"'{p}'" for p in pins] or [extra]


def open_trackers(log, run_dir: Path) -> list:
    """The trackers `log` (a LogSection) turns on, each continuing the tracker run named in
    RUN_DIR/trackers.json if there is one. Rank 0 only."""
    state_path = run_dir / STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    trackers = []
    if log.wandb.project:
        trackers.append(WandbTracker(log.wandb, run_dir, config, state.get("wandb")))
    if log.mlflow.experiment:
        trackers.append(MlflowTracker(log.mlflow, run_dir, config, state.get("mlflow")))
    if trackers:
        state.update({t.name: t.run_id for t in trackers})
        tmp = state_path.with_name(STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(state_path)
    return trackers


def _new_step(tracker, step: int) -> bool:
    """Whether `tracker` takes a row at `step`: only steps past those it holds (the module's docstring)."""
    if step < tracker.next_step:
        return False
    tracker.next_step = step + 1
    return True


def artifacts(run_dir: Path) -> list[Path]:
    return sorted({p for pattern in ARTIFACTS for p in run_dir.glob(pattern) if p.is_file() and p.name != STATE})


class WandbTracker:
    name = "wandb"

    def __init__(self, cfg: WandbSection, run_dir: Path, config: dict, run_id: str | None):
        import wandb

        self.run_dir = run_dir
        kwargs = {"mode": cfg.mode} if cfg.mode != "auto" else {}
        if not os.environ.get("WANDB_DIR"):  # beside the run's other files (offline runs wait there for `wandb sync`)
            kwargs["dir"] = str(run_dir)
        # resume="allow": continue run_id where W&B has it, or start it under that id (a first start
        # that never reached the server). Offline, W&B writes a new segment with the same id, and
        # `wandb sync` uploads the segments of one run in order.
        self.run = wandb.init(project=cfg.project, entity=cfg.entity or None, tags=cfg.tags or None, name=run_dir.name,
                              id=run_id, resume="allow" if run_id else None, **kwargs)
        self.run.config.update(config, allow_val_change=True)  # a resume may change keys (train.max_tokens)
        self.run_id = self.run.id
        self.next_step = self.run.starting_step  # 1 + the last step W&B holds of this run

    def log(self, row: dict) -> None:
        if _new_step(self, row["step"]):
            self.run.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])

    def close(self) -> None:
        import wandb

        files = artifacts(self.run_dir)
        if files:
            art = wandb.Artifact(f"{self.run_id}-reports", type="run-reports")
            for f in files:
                art.add_file(str(f))
            self.run.log_artifact(art)
        self.run.finish()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, cfg: MlflowSection, run_dir: Path, config: dict, run_id: str | None):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self.run_dir, self.client = run_dir, MlflowClient(cfg.tracking_uri or None)
        if run_id:
            try:
                held = self.client.get_run(run_id).data.params
            except MlflowException as e:
                raise UserError(f"{run_dir / STATE}: MLflow run {run_id} is not in {self.client.tracking_uri} "
                                f"({str(e).splitlines()[0]}); remove its \"mlflow\" entry to start a new MLflow run") from None
            self.client.update_run(run_id, status="RUNNING")
            self.next_step = 1 + max((m.step for m in self.client.get_metric_history(run_id, "tokens")), default=-1)
        else:
            exp = self.client.get_experiment_by_name(cfg.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                cfg.experiment, artifact_location=cfg.artifact_location or None)
            run_id, held, self.next_step = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id, {}, 0
        self.run_id = run_id
        # Params are write-once in MLflow: a resume adds the keys the run lacks, and the changed values
        # are in the config.yaml artifact logged at the end. Long values (domain lists) are cut to
        # MLflow's limit, likewise complete in config.yaml.
        params = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in _flatten(config).items() if k not in held]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def log(self, row: dict) -> None:
        from mlflow.entities import Metric

        step = row["step"]
        if not _new_step(self, step):
            return
        now = int(time.time() * 1000)
        metrics, texts = [], {}
        for k, v in row.items():
            if k == "step" or v is None:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics.append(Metric(k, float(v), now, step))
            else:  # the text of a fault note: kept as a tag (the latest), and in metrics.jsonl
                texts[k] = str(v)
        self.client.log_batch(self.run_id, metrics=metrics)
        for k, v in texts.items():
            self.client.set_tag(self.run_id, k, v)

    def close(self) -> None:
        for f in artifacts(self.run_dir):
            self.client.log_artifact(self.run_id, str(f))
        self.client.set_terminated(self.run_id)


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"max_tokens": 1}} -> {"train.max_tokens": "1"}; lists as JSON."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out
