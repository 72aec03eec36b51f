"""A run's metrics.jsonl as the analyses read it (the report, the forgetting report, the scaling fits),
apart from the plotting modules so that the fits do not import matplotlib."""
from __future__ import annotations

import json
from pathlib import Path

from ...errors import UserError

VAL_PREFIX, TRAIN_PREFIX = "val/", "train/"


def read_metrics(path) -> list[dict]:
    """One dict per line of metrics.jsonl (`path`: the file, or the run directory holding it); blank
    lines are skipped, anything else must be a JSON object."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no metrics file; pass a run directory written by `cptrain train`")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); fix or delete that line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no metrics logged yet; run training for at least one logged step")
    return rows


def domains(metrics: list, prefix: str = VAL_PREFIX) -> list:
    """Domain names of the `<prefix><domain>` keys logged anywhere in the run (not the position
    buckets, `<prefix><domain>/pos<lo>-<hi>`)."""
    return sorted({k[len(prefix):] for r in metrics for k in r if k.startswith(prefix) and "/" not in k[len(prefix):]})
