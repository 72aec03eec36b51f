"""Long-document domains: `data prepare --min-doc-tokens N` keeps exactly the documents of at least N
tokens, and the manifest's length histograms (documents by tokens, rows by their longest document)
equal a count made from the shards themselves, for one process and for `--part` + `data merge`."""
import json
from collections import Counter

import numpy as np
import pytest

from cptrain.data_pipeline import tokenizer as tokenizers
from cptrain.data_pipeline.lengths import describe, histogram
from cptrain.data_pipeline.shards import ShardSplit
from cptrain.errors import UserError
from cptrain.launch.cli import main as cli_main
from test_data_support import AUSTEN, run_prepare

pytestmark = [pytest.mark.data, pytest.mark.longctx]
SEQ, MIN_DOC = 128, 1500
GROUPS = [1, 3, 1, 5, 2, 4, 1, 3]  # chapters per document: ~700 to ~4,000 tokens


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, austen_data):
    """Documents of very different lengths: whole chapters joined in groups, and short excerpts between them."""
    chapters = [json.loads(line)["text"] for f in AUSTEN for line in open(f, encoding="utf-8")]
    bounds = np.cumsum([0] + GROUPS)
    docs = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        docs += ["\n\n".join(chapters[a:b]), chapters[i][:150 + 40 * i]]
    path = tmp_path_factory.mktemp("corpus") / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok_file = austen_data / "tokenizer.model"
    tok = tokenizers.load_tokenizer(tok_file)
    lengths = [len(ids) + 1 for ids in tok.encode_batch(docs)]  # + EOS, as prepare appends it
    return path, tok_file, tok, docs, lengths


def _bucket(n: int) -> str:
    return str(1 << (n.bit_length() - 1))


def _rows_and_docs(split: ShardSplit, seq: int, dropped: int):
    """From the shards alone: the rows' longest document runs, and every document's tokens (the
    stream rebuilt from the overlapping samples, cut at its document starts; the tail that packing
    dropped lengthens the last document: it holds no document start when every document is >= seq)."""
    rows, stream, starts = Counter(), [], set()
    for i in range(split.num_samples):
        s = split.get(i)
        ids = np.zeros(seq, dtype=np.int64)
        ids[s["doc_starts"][s["doc_starts"] < seq]] = 1
        rows[_bucket(int(np.bincount(np.cumsum(ids)).max()))] += 1
        stream.append(s["tokens"] if i == 0 else s["tokens"][1:])
        starts |= {i * seq + int(o) for o in s["doc_starts"] if o or not i}  # offset 0 is listed in every row
    stream = np.concatenate(stream)
    cuts = sorted(starts) + [len(stream)]
    docs = [stream[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    lengths = [len(d) for d in docs[:-1]] + [len(docs[-1]) + dropped]
    return dict(sorted(rows.items(), key=lambda kv: int(kv[0]))), docs, lengths


def test_min_doc_tokens_keeps_exactly_the_long_documents(corpus, tmp_path, capsys):
    path, tok_file, tok, docs, lengths = corpus
    assert min(lengths) < SEQ and max(lengths) > 3 * MIN_DOC and sum(n < MIN_DOC for n in lengths) >= 8
    assert cli_main(["data", "prepare", "--input", str(path), "--out", str(tmp_path / "long"), "--tokenizer",
                     str(tok_file), "--seq-len", str(SEQ), "--val-fraction", "0", "--min-doc-tokens", str(MIN_DOC)]) == 0
    m = json.loads((tmp_path / "long" / "manifest.json").read_text())
    train = m["splits"]["train"]
    kept = [np.array(ids + [tok.eos_id]) for ids, n in zip(tok.encode_batch(docs), lengths) if n >= MIN_DOC]
    short = [n for n in lengths if n < MIN_DOC]
    assert (train["documents"], train["short_documents"], train["short_tokens"]) == (len(kept), len(short), sum(short))
    assert train["tokens"] == sum(map(len, kept)) and m["settings"]["min_doc_tokens"] == MIN_DOC
    rows, found, found_lengths = _rows_and_docs(ShardSplit(tmp_path / "long" / "train"), SEQ, train["dropped_tokens"])
    assert len(found) == len(kept)  # the shards hold the long documents, in input order, and nothing else
    for a, b in zip(found[:-1], kept[:-1]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(found[-1], kept[-1][:len(found[-1])])
    assert train["doc_lengths"] == histogram(found_lengths) == histogram(map(len, kept))
    assert train["row_longest_doc"] == rows and sum(rows.values()) == train["samples"]
    report = capsys.readouterr().out
    assert f"{len(short)} documents under {MIN_DOC:,} tokens dropped" in report
    assert f"rows by longest document: {describe(rows)}" in report

    # The train/val draw comes before the length filter: each long document keeps its split.
    whole = run_prepare([path], tmp_path / "all", "--tokenizer", tok_file, "--seq-len", SEQ, "--val-fraction", 0.3)
    split = run_prepare([path], tmp_path / "split", "--tokenizer", tok_file, "--seq-len", SEQ, "--val-fraction", 0.3,
                        "--min-doc-tokens", MIN_DOC)
    for name in ("train", "val"):
        got = split["splits"][name]
        assert 0 < got["documents"] < whole["splits"][name]["documents"]
        assert whole["splits"][name]["documents"] == got["documents"] + got["short_documents"]
        rows, _, found_lengths = _rows_and_docs(ShardSplit(tmp_path / "split" / name), SEQ, got["dropped_tokens"])
        assert got["doc_lengths"] == histogram(found_lengths) and got["row_longest_doc"] == rows
        assert all(int(b) >= MIN_DOC // 2 for b in got["doc_lengths"])
        assert whole["splits"][name]["short_documents"] == 0 and whole["settings"]["min_doc_tokens"] == 0
    with pytest.raises(UserError, match="a lower --min-doc-tokens"):
        run_prepare([path], tmp_path / "none", "--tokenizer", tok_file, "--seq-len", SEQ, "--min-doc-tokens", 10 ** 6)


def test_histograms_of_many_chunks_and_of_merged_parts_count_the_shards(corpus, tmp_path):
    path, tok_file, *_ = corpus
    options = ("--tokenizer", tok_file, "--seq-len", SEQ, "--val-fraction", 0.25, "--chunk-mb", 0.004,
               "--min-doc-tokens", 600)
    one = run_prepare([path], tmp_path / "one", *options)
    assert one["chunks"] >= 6
    parts = [tmp_path / f"part-{i}" for i in range(3)]
    for i, p in enumerate(parts):
        run_prepare([path], p, *options, "--part", f"{i}/3")
    assert cli_main(["data", "merge", *map(str, parts), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert merged["splits"] == one["splits"]  # the parts' counts and histograms summed
    for name, s in one["splits"].items():
        rows, _, _ = _rows_and_docs(ShardSplit(tmp_path / "merged" / name), SEQ, 0)
        assert s["row_longest_doc"] == rows and sum(s["doc_lengths"].values()) == s["documents"] > 0
        assert s["short_documents"] > 0


def test_histogram_buckets():
    assert histogram([1, 2, 3, 4, 7, 8, 8191, 8192, 16383, 16384]) == \
        {"1": 1, "2": 2, "4": 2, "8": 1, "4096": 1, "8192": 2, "16384": 1}
    assert histogram([]) == {} and describe({"512": 3, "8192": 1}) == "512-1K: 3, 8K-16K: 1"
