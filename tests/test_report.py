"""`cptrain report`: summary numbers and plots from a synthetic metrics.jsonl, and bad input."""
import argparse
import json
import math

import pytest

from cptrain.errors import UserError
from cptrain.trainer.analysis.metrics_log import read_metrics
from cptrain.trainer.analysis.report import main, plot_loss, summarize

pytestmark = pytest.mark.schedules

PNG = b"\x89PNG\r\n\x1a\n"


def _rows():
    rows = [{"step": 0, "tokens": 0, "val/web": 5.0, "val/code": 6.0}]  # eval before the first step
    for step in range(1, 21):
        row = {"step": step, "tokens": step * 1000, "loss": 10.0 / step + (1.0 if step == 7 else 0.0),
               "lr": 1e-3 * step / 20, "grad_norm": 1.0 + step, "tokens_per_s": 100.0 * step,
               "mfu": 0.25, "train/web": 3.0}
        if step % 10 == 0:
            row.update({"val/web": 4.0 - step / 10, "val/code": 5.0 - step / 10})
        rows.append(row)
    rows.append({"step": 21, "tokens": 21000, "loss": math.nan, "lr": 0.0, "grad_norm": math.nan, "tokens_per_s": 0.0})
    return rows


def _run_dir(tmp_path, rows=None, text=None):
    run = tmp_path / "run"
    run.mkdir()
    lines = text if text is not None else "\n".join(json.dumps(r) for r in (rows or _rows())) + "\n"
    (run / "metrics.jsonl").write_text(lines)
    return run


def test_summary_numbers():
    s = summarize(_rows())
    assert s["steps"] == 21 and s["tokens"] == 21000
    assert (s["first_loss"], s["last_loss"], s["best_loss"], s["best_loss_step"]) == (10.0, 0.5, 0.5, 20)
    assert s["last_val"] == {"code": 3.0, "web": 2.0}
    assert s["mean_tokens_per_s"] == pytest.approx(sum(100.0 * k for k in range(1, 21)) / 21)
    assert s["mean_mfu"] == 0.25


def test_report_writes_plots_and_summary(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert main(argparse.Namespace(run_dir=str(run), out=None)) == 0
    out = run / "report"
    for name in ("loss.png", "lr.png", "grad_norm.png", "throughput.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_val"] == {"code": 3.0, "web": 2.0} and summary["steps"] == 21
    md = (out / "summary.md").read_text()
    printed = capsys.readouterr().out
    assert "| web | 2 |" in md and "best 0.5 (step 20)" in md and "- tokens: 21,000" in md
    assert md in printed


def test_plot_loss_for_the_demo(tmp_path):
    path = plot_loss(_rows(), tmp_path / "sub" / "loss.png")
    assert path.read_bytes()[:8] == PNG


@pytest.mark.parametrize("text,needle", [
    ("", "no metrics logged yet"),
    ("\n\n", "no metrics logged yet"),
    ('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": \n', "metrics.jsonl:3: not valid JSON"),
    ('{"step": 1}\n[1, 2]\n', "metrics.jsonl:2: each line must be a JSON object"),
])
def test_bad_metrics_name_file_and_line(tmp_path, text, needle):
    run = _run_dir(tmp_path, text=text)
    with pytest.raises(UserError) as e:
        main(argparse.Namespace(run_dir=str(run), out=None))
    assert needle in str(e.value) and str(run) in str(e.value)


def test_missing_metrics_file(tmp_path):
    with pytest.raises(UserError, match="no metrics file"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_cli_dispatch_and_out_dir(tmp_path, capsys):
    from cptrain.launch.cli import main as cli

    run = _run_dir(tmp_path)
    assert cli(["report", str(run), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "summary.md").is_file() and not (run / "report").exists()
    assert cli(["report", str(tmp_path / "nope")]) == 2
    assert "no metrics file" in capsys.readouterr().err
