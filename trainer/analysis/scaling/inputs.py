"""Reading scaling-law inputs: run directories and CSV files, as (N, D, loss) points or as loss curves.

Final loss of a run directory: the mean over `val/*` keys at the last evaluation step when the run
logged any (held-out loss is what scaling laws model), else the mean of the last FINAL_WINDOW
logged training losses (one logged loss is noisy; a short window keeps it close to the end).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ....errors import UserError
from ..metrics_log import VAL_PREFIX, domains, read_metrics
from .curves import Curve

FINAL_WINDOW = 5
# The parameter count each law uses from RUN/run_info.json (Kaplan et al. count non-embedding
# parameters; Jin et al. 2025 use the average non-zero count over training).
RUN_N_KEY = {"kaplan": "params_non_embedding", "chinchilla_sparse": "avg_nonzero_params"}


@dataclass
class Points:
    n: np.ndarray
    d: np.ndarray
    loss: np.ndarray
    names: list[str] = field(default_factory=list)

    def subset(self, mask) -> "Points":
        idx = np.nonzero(mask)[0]
        return Points(self.n[idx], self.d[idx], self.loss[idx], [self.names[i] for i in idx])


def _float(value, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what}: {value!r} is not a number; fix or remove that row") from None
    if not math.isfinite(x):
        raise UserError(f"{what}: {value!r} is not finite; fix or remove that row")
    return x


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); pass an existing CSV or run directory") from None
    if not rows:
        raise UserError(f"{path}: no data rows; the CSV needs a header and one row per run")
    return rows


def _where(rows: list[dict], where: list[str], path: Path) -> list[dict]:
    for cond in where:
        key, sep, value = cond.partition("=")
        if not sep or key not in rows[0]:
            raise UserError(f"--where {cond}: expected COLUMN=VALUE with a column of {path} "
                            f"({', '.join(rows[0])})")
        rows = [r for r in rows if r[key] == value]
    return rows


def points_from_csv(path: Path, n_col: str, d_col: str, loss_col: str, where=()) -> Points:
    rows = _read_csv(path)
    missing = [c for c in (n_col, d_col, loss_col) if c not in rows[0]]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(rows[0])}); "
                        f"name them with --n-col/--d-col/--loss-col")
    rows = _where(rows, list(where), path)
    if not rows:
        raise UserError(f"{path}: no rows left after --where {' '.join(where)}; check the filter values")
    vals = [[_float(r[c], f"{path} row {i + 2} column {c}") for c in (n_col, d_col, loss_col)]
            for i, r in enumerate(rows)]
    names = [r.get("name") or f"{path.name}:{i + 2}" for i, r in enumerate(rows)]
    return Points(*(np.array(v) for v in zip(*vals)), names=names)


def load_fit(path: str) -> dict:
    try:
        res = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"--fit {path}: not a readable fit.json; pass DIR/fit.json from `cptrain scaling fit`") from None
    if "law" not in res or "params" not in res:
        raise UserError(f"--fit {path}: no 'law'/'params'; pass DIR/fit.json from `cptrain scaling fit`")
    return res


def final_loss(rows: list[dict], run: Path, loss_key: str = "loss") -> float:
    """See the module docstring for the choice."""
    if loss_key == "loss":
        evals = [r for r in rows if domains([r])]
        if evals:  # the domains' means, not their position buckets
            last = evals[-1]
            return float(np.mean([_float(last[VAL_PREFIX + d], f"{run} {VAL_PREFIX}{d}") for d in domains([last])]))
    losses = [_float(r[loss_key], f"{run} {loss_key}") for r in rows if r.get(loss_key) is not None]
    if not losses:
        raise UserError(f"{run}: metrics.jsonl logs no '{loss_key}'; train longer than one logging "
                        f"interval or pick another key with --loss-col")
    return float(np.mean(losses[-FINAL_WINDOW:] if loss_key == "loss" else losses[-1:]))


def point_from_run(run: Path, law: str, n_col: str, loss_col: str) -> tuple[float, float, float]:
    info_path = run / "run_info.json"
    if not info_path.is_file():
        raise UserError(f"{run}: no run_info.json (parameter counts); rerun with a current `cptrain train`")
    info = json.loads(info_path.read_text())
    key = n_col if n_col != "params" else RUN_N_KEY.get(law, "params")
    if key == "avg_nonzero_params" and key not in info:
        key = "params"  # a dense run: the average non-zero count is the total count
    if key not in info:
        raise UserError(f"{info_path}: no '{key}'; pick one of {', '.join(info)} with --n-col")
    rows = read_metrics(run)
    tokens = [r["tokens"] for r in rows if "tokens" in r]
    if not tokens:
        raise UserError(f"{run}/metrics.jsonl: no 'tokens' logged; the run has not logged a step yet")
    return _float(info[key], f"{info_path} {key}"), _float(tokens[-1], f"{run} tokens"), final_loss(rows, run, loss_col)


def read_points(inputs, law: str, n_col="params", d_col="tokens", loss_col="loss", where=()) -> Points:
    parts = []
    for item in map(Path, inputs):
        if item.is_dir():
            n, d, l = point_from_run(item, law, n_col, loss_col)
            parts.append(Points(np.array([n]), np.array([d]), np.array([l]), [item.name]))
        else:
            parts.append(points_from_csv(item, n_col, d_col, loss_col, where))
    pts = Points(*(np.concatenate([getattr(p, a) for p in parts]) for a in ("n", "d", "loss")),
                 names=sum((p.names for p in parts), []))
    for arr, what in ((pts.n, "parameter counts"), (pts.d, "token counts"), (pts.loss, "losses")):
        bad = np.nonzero(arr <= 0)[0]
        if len(bad):
            raise UserError(f"{pts.names[bad[0]]}: non-positive {what[:-1]} {arr[bad[0]]}; "
                            f"{what} must be > 0 (remove the row or fix the column)")
    return pts


# --- curves ---------------------------------------------------------------------------------------
def _curve(name: str, steps, lrs, losses) -> Curve:
    steps, lrs = np.asarray(steps, dtype=np.float64), np.asarray(lrs, dtype=np.float64)
    if len(steps) == 0:
        raise UserError(f"{name}: no rows; a loss curve needs step,lr[,loss] rows")
    if np.any(steps != np.round(steps)) or np.any(np.diff(steps) <= 0) or steps[0] < 0:
        raise UserError(f"{name}: steps must be non-negative integers in increasing order")
    if steps[0] != 0:
        raise UserError(f"{name}: the first row is step {int(steps[0])}; the laws sum the LR over "
                        f"every step, so add rows from step 0 (warmup, loss left empty)")
    if np.any(lrs < 0):
        raise UserError(f"{name}: negative learning rate at step {int(steps[np.argmax(lrs < 0)])}")
    lr = np.interp(np.arange(int(steps[-1]) + 1), steps, lrs)
    logged = [(int(s), l) for s, l in zip(steps, losses) if l is not None]
    if any(l <= 0 for _, l in logged):
        raise UserError(f"{name}: non-positive loss; losses must be > 0")
    ls, ll = (np.array([x[0] for x in logged], dtype=np.int64), np.array([x[1] for x in logged]))
    if len(logged) and np.any(np.cumsum(lr)[ls] <= 0):
        raise UserError(f"{name}: a loss is logged before any LR > 0; drop the rows at step 0")
    return Curve(name, lr, ls, ll, steps.astype(np.int64))


def curve_from_csv(path: Path) -> Curve:
    rows = _read_csv(path)
    for col in ("step", "lr"):
        if col not in rows[0]:
            raise UserError(f"{path}: no column '{col}'; a loss-curve CSV has columns step,lr,loss")
    steps = [_float(r["step"], f"{path} row {i + 2} step") for i, r in enumerate(rows)]
    lrs = [_float(r["lr"], f"{path} row {i + 2} lr") for i, r in enumerate(rows)]
    losses = [None if not (r.get("loss") or "").strip() else _float(r["loss"], f"{path} row {i + 2} loss")
              for i, r in enumerate(rows)]
    return _curve(str(path), steps, lrs, losses)


def curve_from_run(run: Path) -> Curve:
    """A run's per-step LR from metrics.jsonl. Runs start from LR 0 at step 0 (the trainer's warmup
    starts there), so a row (0, 0) is added when the first logged step is later."""
    rows = [r for r in read_metrics(run) if "step" in r and "lr" in r]
    if not rows:
        raise UserError(f"{run}/metrics.jsonl: no rows with 'step' and 'lr'")
    steps = [int(r["step"]) for r in rows]
    lrs = [float(r["lr"]) for r in rows]
    losses = [None if r.get("loss") is None else float(r["loss"]) for r in rows]
    if steps[0] != 0:
        steps, lrs, losses = [0] + steps, [0.0] + lrs, [None] + losses
    return _curve(str(run), steps, lrs, losses)


def read_curves(inputs) -> list[Curve]:
    curves = [curve_from_run(p) if p.is_dir() else curve_from_csv(p) for p in map(Path, inputs)]
    for c in curves:
        if not len(c.steps):
            raise UserError(f"{c.name}: no logged loss; fit on curves with a loss column filled in")
    return curves
