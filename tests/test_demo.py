"""`cptrain demo` end to end, shortened: the shipped corpus is prepared, a model pretrained and
continued on the second domain, and every promised output is written."""
import json

import pytest

from cptrain.launch.cli import main

pytestmark = [pytest.mark.data, pytest.mark.eval]


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "4", "--continual-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "first loss" in out and "Forgetting report" in out
    assert (tmp_path / "loss.png").stat().st_size > 0
    pretrain, cont = tmp_path / "runs" / "pretrain", tmp_path / "runs" / "continual"
    assert (pretrain / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    rows = [json.loads(line) for line in (pretrain / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    full = json.loads((cont / "forgetting.json").read_text())
    report = full["domains"]
    assert report["english"]["role"] == "old" and report["spanish"]["role"] == "new"
    assert report["spanish"]["end"] < report["spanish"]["start"], "continuing on Spanish lowers its loss"
    tasks = full["tasks"]  # the word-order tasks built from the shipped texts
    assert tasks["english_order"]["role"] == "old" and tasks["spanish_order"]["role"] == "new"
    assert all(0 <= t["start"] <= 1 and 0 <= t["end"] <= 1 for t in tasks.values())
    assert "| english_order | old |" in (cont / "forgetting.md").read_text()
    assert (cont / "metrics.jsonl").read_text().count("eval/spanish_order/acc\"") >= 2  # at the start and the end
