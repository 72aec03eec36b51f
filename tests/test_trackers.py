"""Experiment trackers fed by the loop, read back from their own stores: W&B's offline run files
and an MLflow sqlite store. Nothing reaches a network: W&B runs offline, telemetry is off."""
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest

from cptrain.errors import UserError
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import run
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.trackers


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """W&B offline with its files under tmp (the run's in RUN_DIR/wandb, the default without WANDB_DIR);
    no error reports or telemetry from either library."""
    monkeypatch.delenv("WANDB_DIR", raising=False)
    for key in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home"))
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",
                       "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}.items():
        monkeypatch.setenv(key, value)


def _tracked(tmp_path, data, **extra):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {"log.wandb": "{project: cptrain-tests, mode: offline, tags: [tiny]}",
                 "log.mlflow": f"{{experiment: tiny, tracking_uri: '{store}', artifact_location: '{tmp_path / 'mlartifacts'}'}}",
                 **extra}
    return load_config(None, tiny_overrides(tmp_path / "run", data, **overrides))


def _rows(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


# ---- W&B's offline run file: a LevelDB-format log (https://github.com/google/leveldb/blob/main/doc/log_format.md)
# of protobuf Records (wandb.proto.wandb_internal_pb2). wandb 0.31 ships no Python reader for it.
BLOCK, HEADER = 32768, 7


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        if kind == 0:  # zeroed preallocation at the end
            break
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"{path}: corrupt chunk at {pos}"
        pos, pending = pos + HEADER + length, pending + chunk
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_segments(wandb_dir: Path) -> list[dict]:
    """Each offline run directory (one per start of the run): its id, config, history and artifact files."""
    out = []
    for folder in sorted(wandb_dir.glob("offline-run-*")):
        seg = {"history": {}, "artifacts": []}
        for r in wandb_records(next(folder.glob("*.wandb"))):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                seg["id"] = r.run.run_id
                seg["config"] = {_key(u): json.loads(u.value_json) for u in r.run.config.update}
                seg["tags"] = list(r.run.tags)
            elif kind == "history":
                seg["history"][r.history.step.num] = {_key(i): json.loads(i.value_json) for i in r.history.item}
            elif kind == "artifact":
                seg["artifacts"] += [e.path for e in r.artifact.manifest.contents]
            elif kind == "config":
                seg["config"].update({_key(u): json.loads(u.value_json) for u in r.config.update})
        out.append(seg)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # an item names its key in one field or the other


def mlflow_history(cfg, run_id: str, key: str) -> dict[int, list[float]]:
    from mlflow.tracking import MlflowClient

    out: dict[int, list[float]] = {}
    for m in MlflowClient(cfg.log.mlflow.tracking_uri).get_metric_history(run_id, key):
        out.setdefault(m.step, []).append(m.value)
    return out


def test_trackers_hold_every_row_config_and_reports(tmp_path, austen_data):
    from mlflow.tracking import MlflowClient

    cfg = _tracked(tmp_path, austen_data, **{"train.max_tokens": 6144})
    run(cfg)
    run_dir = tmp_path / "run"
    rows = _rows(run_dir / "metrics.jsonl")
    losses = {s: r["loss"] for s, r in rows.items() if "loss" in r}
    assert sorted(losses) == list(range(1, 7)) and 0 in rows  # six steps, the evaluation at the start
    ids = json.loads((run_dir / "trackers.json").read_text())

    (seg,) = wandb_segments(run_dir / "wandb")
    assert seg["id"] == ids["wandb"] and seg["tags"] == ["tiny"]
    assert {s: h["loss"] for s, h in seg["history"].items() if "loss" in h} == losses
    for step, row in rows.items():  # every key of every row, the evaluations at the start and the end included
        assert {k: seg["history"][step][k] for k in row if k != "step"} == {k: v for k, v in row.items() if k != "step"}
    assert seg["config"]["train"]["max_tokens"] == 6144 and seg["config"]["model"]["dim"] == cfg.model.arch.dim
    assert {"config.yaml", "run_info.json"} <= set(seg["artifacts"]) and "trackers.json" not in seg["artifacts"]

    client = MlflowClient(cfg.log.mlflow.tracking_uri)
    ml = client.get_run(ids["mlflow"])
    assert ml.info.status == "FINISHED" and ml.info.run_name == "run"
    assert mlflow_history(cfg, ids["mlflow"], "loss") == {s: [v] for s, v in losses.items()}
    for key in {k for row in rows.values() for k in row if k != "step"}:
        assert mlflow_history(cfg, ids["mlflow"], key) == {s: [r[key]] for s, r in rows.items() if key in r}, key
    assert ml.data.params["train.max_tokens"] == "6144" and ml.data.params["log.mlflow.experiment"] == "tiny"
    assert {"config.yaml", "run_info.json"} <= {a.path for a in client.list_artifacts(ids["mlflow"])}
    assert (tmp_path / "mlartifacts").is_dir()


def test_resumed_run_continues_the_tracker_runs(tmp_path, austen_data):
    """The first run checkpoints at step 4 and logs to step 8; the resume goes back to step 4, with a
    longer budget (so its steps 5-8 differ from the first ones) and continues to step 12 in the
    same tracker runs. MLflow keeps the first values of steps 5-8 (metrics.dropped.jsonl's) and takes
    9-12; the resumed W&B segment, written offline, holds what the resumed run logged."""
    import shutil

    cfg = _tracked(tmp_path, austen_data, **{"train.max_tokens": 8192, "checkpoint.interval_tokens": 4096})
    run(cfg)
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    first = _rows(run_dir / "metrics.jsonl")
    ids = json.loads((run_dir / "trackers.json").read_text())
    shutil.rmtree(ckpts / "step-00000008")  # the run died after its step-4 checkpoint
    (ckpts / "latest").write_text("step-00000004\n")
    resumed_cfg = _tracked(tmp_path, austen_data, **{"train.max_tokens": 12288, "checkpoint.interval_tokens": 4096})
    run(resumed_cfg, resume=True)

    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    rows, dropped = _rows(run_dir / "metrics.jsonl"), _rows(run_dir / "metrics.dropped.jsonl")
    assert sorted(dropped) == [5, 6, 7, 8] and sorted(rows) == list(range(13))
    assert rows[5]["lr"] != dropped[5]["lr"] and rows[6]["loss"] != dropped[6]["loss"]  # the new budget changed the schedule

    ml = mlflow_history(resumed_cfg, ids["mlflow"], "loss")
    assert sorted(ml) == list(range(1, 13)) and all(len(v) == 1 for v in ml.values()), "one value per step"
    assert {s: v for s, (v,) in ml.items()} == {s: (dropped if s in dropped else rows)[s]["loss"] for s in range(1, 13)}
    from mlflow.tracking import MlflowClient
    assert MlflowClient(resumed_cfg.log.mlflow.tracking_uri).get_run(ids["mlflow"]).data.params["train.max_tokens"] == "8192"

    before, after = wandb_segments(run_dir / "wandb")
    assert before["id"] == after["id"] == ids["wandb"]
    assert {s: h["loss"] for s, h in before["history"].items() if "loss" in h} == {s: first[s]["loss"] for s in range(1, 9)}
    assert {s: h["loss"] for s, h in after["history"].items()} == {s: rows[s]["loss"] for s in range(5, 13)}
    assert after["config"]["train"]["max_tokens"] == 12288


def test_new_run_directory_starts_new_tracker_runs(tmp_path, austen_data):
    cfg = _tracked(tmp_path, austen_data, **{"train.max_tokens": 1024, "log.mlflow": "{}"})
    run(cfg)
    first = json.loads((tmp_path / "run" / "trackers.json").read_text())
    assert set(first) == {"wandb"}
    run(cfg, overwrite=True)  # the old run (its trackers.json too) is moved aside
    second = json.loads((tmp_path / "run" / "trackers.json").read_text())
    assert second["wandb"] != first["wandb"]


def test_tracker_config_errors_are_one_line(tmp_path, austen_data, monkeypatch):
    def load(**extra):
        return load_config(None, tiny_overrides(tmp_path / "run", austen_data, **extra))

    with pytest.raises(UserError, match=r"log\.wandb needs log\.wandb\.project"):
        load(**{"log.wandb.tags": "[a]"})
    with pytest.raises(UserError, match=r"log\.mlflow needs log\.mlflow\.experiment"):
        load(**{"log.mlflow.tracking_uri": "http://localhost:5000"})
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(UserError, match="MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///"):
        load(**{"log.mlflow.experiment": "e", "log.mlflow.tracking_uri": f"file://{tmp_path}/mlruns"})
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    with pytest.raises(UserError) as e:
        load(**{"log.wandb.project": "p"})
    assert str(e.value) == "config: log.wandb needs the wandb package, which is not installed; pip install 'wandb==0.31.0'"
