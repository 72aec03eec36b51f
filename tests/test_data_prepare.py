"""`cptrain data prepare` on real text: inputs (jsonl, parquet, txt, globs), tokenizers, packing,
the manifest, idempotent reruns after an interruption, and bad-record reporting."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cptrain.data_pipeline import tokenizer as tokenizers
from cptrain.data_pipeline.shards import ShardSplit
from cptrain.data_pipeline.prepare import pack
from cptrain.launch.cli import main as cli_main
from cptrain.errors import UserError
from test_data_support import AUSTEN, FIXTURES, SPANISH, run_prepare

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A sentencepiece model trained on the fixtures (also the --train-tokenizer path)."""
    out = tmp_path_factory.mktemp("tok") / "p"
    run_prepare(AUSTEN, out, "--train-tokenizer", 600, "--seq-len", 64, "--val-fraction", 0)
    return out / "tokenizer.model"


def _texts(path):
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8")]


def _tree_digest(root):
    """Hash of every shard and index file under root (the manifest's timing field excluded)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and ".work" not in p.parts and p.name != "manifest.json":
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_packing_keeps_every_token_once_and_document_boundaries(spm_model, tmp_path):
    tok = tokenizers.load_tokenizer(spm_model)
    texts = _texts(AUSTEN[0])
    m = run_prepare([AUSTEN[0]], tmp_path / "d", "--tokenizer", spm_model, "--seq-len", 64, "--val-fraction", 0)
    stream = np.concatenate([np.array(ids + [tok.eos_id]) for ids in tok.encode_batch(texts)])
    starts = set(np.cumsum([0] + [len(ids) + 1 for ids in tok.encode_batch(texts)])[:-1].tolist())
    reader = ShardSplit(tmp_path / "d" / "train")
    samples = [reader.get(i) for i in range(reader.num_samples)]
    assert m["splits"]["train"]["samples"] == len(samples) == (len(stream) - 1) // 64
    assert m["splits"]["train"]["tokens"] == len(stream) and m["splits"]["train"]["documents"] == len(texts)
    assert m["splits"]["train"]["dropped_tokens"] == len(stream) - len(samples) * 64 - 1
    rebuilt = np.concatenate([samples[0]["tokens"]] + [s["tokens"][1:] for s in samples[1:]])
    np.testing.assert_array_equal(rebuilt, stream[:len(rebuilt)])
    for i, s in enumerate(samples):
        assert s["tokens"].dtype == np.uint16 and len(s["tokens"]) == 65
        expected = sorted({0} | {p - 64 * i for p in starts if 0 <= p - 64 * i <= 64})
        assert s["doc_starts"].tolist() == expected


def test_pack_property_small_documents():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, rng.integers(1, 9)).astype(np.uint32) for _ in range(40)]
    out = list(pack(docs, 5))
    stream = np.concatenate(docs)
    assert len(out) == (len(stream) - 1) // 5
    for i, (tokens, starts) in enumerate(out):
        np.testing.assert_array_equal(tokens, stream[5 * i:5 * i + 6])
        assert starts[0] == 0 and np.all(np.diff(starts) > 0) and starts[-1] <= 5


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt_glob"])
def test_input_kinds_and_manifest(spm_model, tmp_path, kind):
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"body": _texts(AUSTEN[0])}), tmp_path / "a.parquet")
        inputs, extra = [tmp_path / "a.parquet"], ["--text-field", "body"]
    elif kind == "jsonl":
        inputs, extra = [FIXTURES], []  # a folder: its .jsonl and .txt files
    else:
        inputs, extra = [SPANISH], ["--txt-split", "line"]
    m = run_prepare(inputs, tmp_path / "o", "--tokenizer", spm_model, "--seq-len", 32,
                    "--compression", "zstd", "--val-fraction", 0.25, *extra)
    assert m["seq_len"] == 32 and m["dtype"] == "uint16" and m["version"] == 1
    assert m["tokenizer"]["kind"] == "sentencepiece" and m["tokenizer"]["vocab_size"] == 600
    assert m["tokenizer"]["sha256"] == hashlib.sha256(spm_model.read_bytes()).hexdigest()
    assert (tmp_path / "o" / m["tokenizer"]["file"]).read_bytes() == spm_model.read_bytes()
    n_docs = {"parquet": 12, "jsonl": 12 + 8 + 3, "txt_glob": None}[kind]
    total = m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"]
    if n_docs:
        assert total == n_docs
    else:  # one document per non-empty line of the three files
        assert total == sum(1 for f in sorted(FIXTURES.glob("rv1909_*.txt"))
                            for line in f.read_text().splitlines() if line.strip())
    assert m["splits"]["val"]["documents"] > 0 and m["bad_records"]["total"] == 0
    for split in ("train", "val"):
        index = json.loads((tmp_path / "o" / split / "index.json").read_text())
        assert sum(s["samples"] for s in index["shards"]) == m["splits"][split]["samples"]
        assert all(s["compression"] == "zstd" for s in index["shards"])


def test_hf_tokenizer_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(_texts(AUSTEN[0]), trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"]))
    folder = tmp_path / "hf"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    m = run_prepare([AUSTEN[1]], tmp_path / "o", "--tokenizer", folder, "--seq-len", 32)
    assert m["tokenizer"]["kind"] == "hf" and m["tokenizer"]["eos_id"] == 1
    assert m["tokenizer"]["file"] == "tokenizer" and (tmp_path / "o" / "tokenizer" / "tokenizer.json").exists()
    loaded = tokenizers.load_tokenizer(tmp_path / "o" / "tokenizer")
    assert loaded.identity() == {k: v for k, v in m["tokenizer"].items() if k != "file"}


@pytest.mark.resume
def test_rerun_after_interruption_gives_same_output(spm_model, tmp_path):
    args = [AUSTEN, tmp_path / "o", "--tokenizer", spm_model, "--seq-len", 32, "--chunk-mb", 0.01]
    m = run_prepare(*args)
    assert m["chunks"] >= 4
    digest = _tree_digest(tmp_path / "o")
    first_chunk = sorted((tmp_path / "o" / "train" / "chunk-00000").glob("shard.*"))[0]
    mtime = first_chunk.stat().st_mtime_ns
    # An interruption while the last chunk was being written, before the merge and manifest:
    last = m["chunks"] - 1
    (tmp_path / "o" / "manifest.json").unlink()
    (tmp_path / "o" / ".work" / "done" / f"chunk-{last:05d}.json").unlink()
    for split in ("train", "val"):
        (tmp_path / "o" / split / "index.json").unlink(missing_ok=True)
        for shard in (tmp_path / "o" / split / f"chunk-{last:05d}").glob("shard.*"):
            shard.write_bytes(b"partial")
    assert run_prepare(*args)["chunks"] == m["chunks"]
    assert _tree_digest(tmp_path / "o") == digest
    assert first_chunk.stat().st_mtime_ns == mtime  # finished chunks were not redone
    with pytest.raises(UserError, match="different inputs or settings"):
        run_prepare(*args[:-1], 0.02)


@pytest.mark.resume
@pytest.mark.faults
def test_killed_prepare_resumes(spm_model, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "cptrain.launch.cli", "data", "prepare", "--input", *AUSTEN, "--out", str(out),
           "--tokenizer", str(spm_model), "--seq-len", "32", "--chunk-mb", "0.002"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list((out / ".work" / "done").glob("*.json"))) < 2:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: any tokenizer workers too
        proc.wait()
    assert not (out / "manifest.json").exists()
    resumed = run_prepare(AUSTEN, out, "--tokenizer", spm_model, "--seq-len", 32, "--chunk-mb", 0.002)
    fresh = run_prepare(AUSTEN, tmp_path / "fresh", "--tokenizer", spm_model, "--seq-len", 32, "--chunk-mb", 0.002)
    assert resumed["splits"] == fresh["splits"]
    assert _tree_digest(out) == _tree_digest(tmp_path / "fresh")


def test_a_real_replacement_character_is_text_not_a_decoding_error(spm_model, tmp_path):
    """U+FFFD written as UTF-8 (EF BF BD) is a character web text and code hold: in a file that is valid
    UTF-8 it is kept. A JSON escape of an unpaired surrogate makes a record bad (tokenizers refuse it);
    bytes that are not UTF-8 do too (test_bad_records_reported_with_file_and_line)."""
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(json.dumps({"text": "a r\ufffdsum\u00e9 kept " * 8}, ensure_ascii=False).encode() + b"\n"
                     + json.dumps({"text": "half a pair \ud83d"}).encode() + b"\n")
    txt = tmp_path / "page.txt"
    txt.write_bytes("scraped text \ufffd\ufffd with its replacement characters\n".encode() * 8)
    m = run_prepare([docs, txt], tmp_path / "o", "--tokenizer", spm_model, "--seq-len", 16, "--val-fraction", 0)
    assert m["splits"]["train"]["documents"] == 2 and m["bad_records"]["total"] == 1
    assert m["bad_records"]["examples"] == [{"where": f"{docs}:line 2", "problem": "unpaired surrogate \\ud83d in the text"}]


@pytest.mark.faults
def test_bad_records_reported_with_file_and_line(spm_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = [json.dumps({"text": t}) for t in _texts(AUSTEN[1])[:4]]
    bad.write_bytes("\n".join([good[0], "{not json", good[1], json.dumps({"title": "no text"}), "",
                               json.dumps({"text": "   "}), good[2], json.dumps({"text": 7})]).encode()
                    + b'\n{"text": "caf\xe9 latin-1"}\n' + good[3].encode() + b"\n")
    code = cli_main(["data", "prepare", "--input", str(bad), "--out", str(tmp_path / "o"),
                     "--tokenizer", str(spm_model), "--seq-len", "16", "--val-fraction", "0"])
    assert code == 0
    report = capsys.readouterr().out
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["bad_records"]["total"] == 5 and m["splits"]["train"]["documents"] == 4
    where = {e["where"]: e["problem"] for e in m["bad_records"]["examples"]}
    assert where[f"{bad}:line 2"].startswith("malformed JSON")
    assert where[f"{bad}:line 4"] == "missing text field 'text'"
    assert where[f"{bad}:line 6"] == "empty document"
    assert where[f"{bad}:line 8"] == "text field 'text' is int, not a string"
    assert where[f"{bad}:line 9"] == "invalid UTF-8"
    assert f"{bad}:line 2" in report and "bad records skipped: 5" in report
    with pytest.raises(UserError, match=rf"{bad}:line 2: malformed JSON"):
        run_prepare([bad], tmp_path / "o2", "--tokenizer", spm_model, "--on-bad-record", "fail")
    bad.write_text("\n".join(good) + "\n")  # the user fixes the file and runs the same command
    fixed = run_prepare([bad], tmp_path / "o2", "--tokenizer", spm_model, "--on-bad-record", "fail")
    assert fixed["bad_records"]["total"] == 0 and fixed["splits"]["train"]["documents"] > 0


@pytest.mark.faults
def test_empty_or_missing_corpus_fails_before_work(spm_model, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    for inputs, needle in [([tmp_path / "nope.jsonl"], "no such file"), ([tmp_path / "empty.txt"], "no input text"),
                           ([str(tmp_path / "*.parquet")], "no file matches"), ([tmp_path / "x.csv"], "no such file")]:
        with pytest.raises(UserError, match=needle):
            run_prepare(inputs, tmp_path / "o", "--tokenizer", spm_model)
        assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="cannot fill one sample"):
        run_prepare([FIXTURES / "rv1909_0.txt"], tmp_path / "o", "--tokenizer", spm_model, "--seq-len", 100000)


def test_no_validation_documents_warns_with_the_fix(spm_model, tmp_path, capsys):
    """One .txt file read as one document leaves --val-fraction with nothing to hold out."""
    run_prepare([FIXTURES / "rv1909_0.txt"], tmp_path / "one", "--tokenizer", spm_model, "--seq-len", 64,
                "--val-fraction", 0.03)
    err = capsys.readouterr().err
    assert "warning: --val-fraction 0.03 left no validation sample (1 document in all)" in err
    assert "--txt-split paragraph|line" in err
    run_prepare([FIXTURES / "rv1909_0.txt"], tmp_path / "lines", "--tokenizer", spm_model, "--seq-len", 64,
                "--val-fraction", 0.03, "--txt-split", "line")
    assert "warning" not in capsys.readouterr().err
