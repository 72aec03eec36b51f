"""The sequence-length schedule (data.seq_len_schedule): rows of the prepared length cut into equal
pieces hold exactly the rows' tokens, every target once, with documents restarted at each piece; a
two-phase run resumes bit for bit inside the first phase and at the change; MFU follows the step's
length; context parallelism splits the pieces as one process trains them; bad lengths are refused
in one line at config load."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cptrain.data_pipeline.config import DataConfig, SeqLenPhase
from cptrain.data_pipeline.loader import collate
from cptrain.data_pipeline.seqlen import cut_rows, seq_len_at
from cptrain.data_pipeline.shards import ShardSplit
from cptrain.errors import UserError
from cptrain.model.attention import doc_positions
from cptrain.model.config import flops_per_token
from cptrain.model.decoder import Decoder
from cptrain.model.presets import preset
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import run
from cptrain.trainer.loss import token_losses
from tests.conftest import tiny_overrides
from tests.multiproc import free_port, run_processes

pytestmark = pytest.mark.longctx
SCHEDULE = "[{until_tokens: 8192, seq_len: 16}]"  # steps 1-8 on rows of 16 tokens, then the prepared 64


def _batch(data_dir: Path) -> dict:
    """A loader batch of six rows, four of them holding a document boundary."""
    split = ShardSplit(data_dir / "train")
    rows = [k for k in range(split.num_samples) if len(split.get(k)["doc_starts"]) > 1][:4] + [0, 1]
    return collate([(0, k, split.get(k)["tokens"], split.get(k)["doc_starts"]) for k in rows])


def test_cut_rows_hold_every_target_once_with_documents_restarted(austen_data):
    batch = _batch(austen_data)
    assert cut_rows(batch, 64) is batch and (batch["doc_ids"][:, 1:] != batch["doc_ids"][:, :-1]).any()
    cut = cut_rows(batch, 16)
    assert cut["tokens"].shape == (24, 17) and cut["doc_ids"].shape == (24, 17)
    assert torch.equal(cut["sample_id"], batch["sample_id"].repeat_interleave(4))
    assert torch.equal(cut["domain"], batch["domain"].repeat_interleave(4))
    for r in range(6):
        pieces, docs = cut["tokens"][4 * r:4 * r + 4], cut["doc_ids"][4 * r:4 * r + 4]
        for j in range(4):  # piece j is tokens[16 j : 16 (j + 1) + 1] of its row
            assert torch.equal(pieces[j], batch["tokens"][r, 16 * j:16 * j + 17])
            row_docs = batch["doc_ids"][r, 16 * j:16 * j + 17]
            assert torch.equal(docs[j], row_docs - row_docs[0]) and docs[j][0] == 0
        assert torch.equal(pieces[:, 1:].flatten(), batch["tokens"][r, 1:])  # the row's targets, each once, in order
        assert torch.equal(pieces[:, :-1].flatten(), batch["tokens"][r, :-1])

    # What the model computes on the pieces is the whole rows' losses with a document start added at
    # each piece start: attention and RoPE positions restart there, nothing else changes.
    torch.manual_seed(0)
    model = Decoder(preset("tiny"))
    model.init_weights()
    starts = torch.zeros_like(batch["doc_ids"])
    starts[:, 1:] = batch["doc_ids"][:, 1:] != batch["doc_ids"][:, :-1]
    starts[:, ::16] = 1
    restarted = {**batch, "doc_ids": starts.cumsum(1)}
    with torch.no_grad():
        want = token_losses(model, restarted).reshape(24, 16)
        got = token_losses(model, cut)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(doc_positions(cut["doc_ids"][:, :-1]), doc_positions(restarted["doc_ids"][:, :-1]).reshape(24, 16))


def _overrides(run_dir: Path, data: Path, **extra) -> list[str]:
    base = {"train.max_tokens": 16384, "checkpoint.interval_tokens": 4096, "eval.interval_tokens": 4096,
            "checkpoint.keep_last": 4, "train.peak_tflops": 1.0, "data.seq_len_schedule": SCHEDULE}
    return tiny_overrides(run_dir, data, **{**base, **extra})


def _cfg(run_dir: Path, data: Path, **extra):
    return load_config(None, _overrides(run_dir, data, **extra))


def _rows(rows):
    keys = ("step", "tokens", "seq_len", "loss", "grad_norm", "lr", "val/austen")
    return [tuple(r.get(k) for k in keys) for r in rows if "loss" in r]


def _rewind(run_dir: Path, step: int) -> None:
    for c in (run_dir / "checkpoints").glob("step-*"):
        if int(c.name.split("-")[1]) > step:
            shutil.rmtree(c)
    (run_dir / "checkpoints" / "latest").write_text(f"step-{step:08d}\n")


@pytest.mark.resume
def test_a_two_phase_run_resumes_bit_exactly_inside_the_first_phase_and_at_the_change(tmp_path, austen_data):
    cfg = _cfg(tmp_path / "run", austen_data)
    full = run(cfg)
    rows = [r for r in full if "loss" in r]
    assert [r["seq_len"] for r in rows] == [16] * 8 + [64] * 8  # the step after 8,192 tokens is the first at 64
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in logged if "loss" in r] == [r["seq_len"] for r in rows]
    for r in rows:  # MFU from the attention FLOPs of the step's own length
        assert r["mfu"] * 1e12 / r["tokens_per_s"] == pytest.approx(flops_per_token(cfg.model.arch, r["seq_len"]), rel=1e-9)
    assert flops_per_token(cfg.model.arch, 16) < flops_per_token(cfg.model.arch, 64)
    plain = run(_cfg(tmp_path / "plain", austen_data, **{"data.seq_len_schedule": "[]", "train.max_tokens": 1024}))
    assert plain[1]["loss"] != rows[0]["loss"]  # the same rows, cut: another loss from the first step on
    assert plain[0]["val/austen"] == full[0]["val/austen"]  # validation stays at the full length

    for step in (4, 8):  # inside the first phase, and at the change of length
        resumed_dir = tmp_path / f"from-{step}"
        shutil.copytree(tmp_path / "run", resumed_dir)
        _rewind(resumed_dir, step)
        resumed = run(_cfg(resumed_dir, austen_data), resume=True)
        assert _rows(resumed) == [x for x in _rows(full) if x[0] > step], step


@pytest.mark.cp
@pytest.mark.distributed
def test_context_parallel_pieces_train_as_one_process(tmp_path, austen_data):
    """Two ranks, ring attention over each piece (rows of 16 split into 4 chunks of 4), then over full rows."""
    extra = {"model.n_heads": 8, "model.n_kv_heads": 4, "train.max_tokens": 10240, "train.precision": "fp32",
             "train.device": "cpu", "eval.at_start": False}
    run(_cfg(tmp_path / "one", austen_data, **extra))
    jobs = tmp_path / "jobs.json"
    ring = {"parallel.cp": 2, "parallel.cp_method": "ring"}
    jobs.write_text(json.dumps([{"overrides": _overrides(tmp_path / "cp", austen_data, **extra, **ring)}]))
    run_processes([[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), str(Path(__file__).with_name("dist_worker.py")), str(jobs)]], timeout=600)
    want, got = ({r["step"]: r for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
                  if "loss" in r} for d in ("one", "cp"))
    assert sorted(got) == list(range(1, 11)) and [got[s]["seq_len"] for s in sorted(got)] == [16] * 8 + [64] * 2
    for step, row in want.items():
        for key in ("loss", "grad_norm", "val/austen"):
            if key in row:
                assert got[step][key] == pytest.approx(row[key], rel=1e-5), (step, key)


@pytest.mark.faults
@pytest.mark.parametrize("extra, message", [
    ({"data.seq_len_schedule": "[{until_tokens: 4096, seq_len: 48}]"},
     r"data.seq_len_schedule\[0\].seq_len=48 does not divide data.seq_len=64, the length the rows were prepared at"),
    ({"data.seq_len_schedule": "[{until_tokens: 4096, seq_len: 16}, {until_tokens: 4096, seq_len: 32}]"},
     r"data.seq_len_schedule\[1\].until_tokens=4096 must be positive and above the previous"),
    ({"data.seq_len_schedule": "[{until_tokens: 4096, seq_len: 4}]", "parallel.cp": 4, "parallel.cp_method": "ring"},
     r"data.seq_len_schedule\[0\].seq_len=4 does not split into 8 equal pieces"),
])
def test_lengths_that_cannot_be_cut_are_refused_in_one_line(tmp_path, austen_data, extra, message):
    with pytest.raises(UserError, match=message) as e:
        load_config(None, tiny_overrides(tmp_path, austen_data, **extra))
    assert "\n" not in str(e.value)


def test_the_length_of_a_step_follows_the_tokens_before_it():
    cfg = DataConfig(seq_len=64, seq_len_schedule=[SeqLenPhase(100, 16), SeqLenPhase(300, 32)])
    assert [seq_len_at(cfg, t) for t in (0, 99, 100, 299, 300, 10 ** 9)] == [16, 16, 32, 32, 64, 64]
