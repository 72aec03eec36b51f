"""Preparing on many processes: `data prepare --part I/N` on real text, then `data merge` gives the
one-process directory file for file (so sample for sample) with the same manifest counts; parts
that do not belong together are refused in one line."""
import json

import numpy as np
import pytest

from cptrain.data_pipeline import merge
from cptrain.data_pipeline.shards import ShardSplit
from cptrain.errors import UserError
from cptrain.launch.cli import main as cli_main
from test_data_support import AUSTEN, run_prepare

pytestmark = pytest.mark.data
OPTIONS = ("--seq-len", 32, "--val-fraction", 0.2, "--chunk-mb", 0.004)  # 10 chunks over both files


@pytest.fixture(scope="module")
def tokenizer(austen_data):
    return austen_data / "tokenizer.model"


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("whole") / "d"
    run_prepare(AUSTEN, out, "--tokenizer", tokenizer, *OPTIONS)
    return out


def _files(root):
    """Every file of a prepared directory but its manifest and work folder, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and ".work" not in p.parts and p.name != "manifest.json"}


def _prepare_parts(root, tokenizer, n: int, *extra) -> list:
    parts = [root / f"part-{i}" for i in range(n)]
    for i, p in enumerate(parts):
        run_prepare(AUSTEN, p, "--tokenizer", tokenizer, *OPTIONS, "--part", f"{i}/{n}", *extra)
    return parts


@pytest.mark.parametrize("n", [2, 16])
def test_merged_parts_equal_the_one_process_prepare(tmp_path, whole, tokenizer, n, capsys):
    parts = _prepare_parts(tmp_path, tokenizer, n)
    one = json.loads((whole / "manifest.json").read_text())
    assert one["chunks"] >= 10 and (n < one["chunks"] or any(
        not json.loads((p / "manifest.json").read_text())["part"]["chunks"] for p in parts))  # 16: some parts empty
    # Part I holds chunks I, I+N, ... under their own numbers and is a prepared directory of its own.
    first = json.loads((parts[0] / "manifest.json").read_text())
    assert first["part"] == {"index": 0, "count": n, "chunks": list(range(0, one["chunks"], n))}
    assert ShardSplit(parts[0] / "train").num_samples == first["splits"]["train"]["samples"]

    out = tmp_path / "merged"
    assert cli_main(["data", "merge", *map(str, reversed(parts)), "--out", str(out)]) == 0  # any order
    assert f"prepared {out}" in capsys.readouterr().out
    assert _files(out) == _files(whole)  # chunk folders, shards, indexes, tokenizer: byte for byte
    for split in ("train", "val"):
        a, b = ShardSplit(whole / split), ShardSplit(out / split)
        assert a.num_samples == b.num_samples > 0
        for i in range(a.num_samples):
            x, y = a.get(i), b.get(i)
            assert np.array_equal(x["tokens"], y["tokens"]) and np.array_equal(x["doc_starts"], y["doc_starts"])
    merged = json.loads((out / "manifest.json").read_text())
    assert merged["splits"] == one["splits"] and merged["chunks"] == one["chunks"]
    assert merged["merged_from"] == [str(p.resolve()) for p in parts] and "part" not in merged
    differ = {k for k in one.keys() | merged.keys() if one.get(k) != merged.get(k)}
    assert differ == {"out", "seconds", "merged_from"}


@pytest.mark.faults
def test_parts_that_do_not_belong_together_are_refused(tmp_path, tokenizer, capsys):
    parts = _prepare_parts(tmp_path, tokenizer, 2)
    with pytest.raises(UserError, match=r"missing \[1\]"):
        merge.run([str(parts[0])], str(tmp_path / "m1"))
    with pytest.raises(UserError, match="given twice"):
        merge.run([str(parts[0]), str(parts[0])], str(tmp_path / "m2"))
    longer = tmp_path / "longer"
    run_prepare(AUSTEN, longer, "--tokenizer", tokenizer, "--seq-len", 64, "--val-fraction", 0.2, "--chunk-mb", 0.004,
                "--part", "1/2")
    with pytest.raises(UserError, match="seq_len 64, but .* has 32"):
        merge.run([str(parts[0]), str(longer)], str(tmp_path / "m3"))
    other_tok = tmp_path / "tok"
    run_prepare(AUSTEN, other_tok, "--train-tokenizer", 400, "--seq-len", 32, "--val-fraction", 0)
    other = tmp_path / "other"
    run_prepare(AUSTEN, other, "--tokenizer", other_tok / "tokenizer.model", *OPTIONS, "--part", "1/2")
    with pytest.raises(UserError, match="another tokenizer"):
        merge.run([str(parts[0]), str(other)], str(tmp_path / "m4"))
    with pytest.raises(UserError, match="prepared without --part"):
        merge.run([str(parts[0]), str(other_tok)], str(tmp_path / "m5"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="not empty"):
        merge.run(list(map(str, parts)), str(tmp_path / "full"))
    assert not any((tmp_path / f"m{i}").exists() for i in range(1, 6)), "refused before writing"

    prepare = ["data", "prepare", "--input", AUSTEN[0], "--out", str(tmp_path / "p")]
    for argv, message in [(prepare + ["--train-tokenizer", "300", "--part", "0/2"], "--part needs --tokenizer"),
                          (prepare + ["--tokenizer", str(tokenizer), "--part", "2/2"], "--part 2/2: give I/N")]:
        capsys.readouterr()
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
