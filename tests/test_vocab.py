"""Vocabulary extension: on the real SmolLM2-135M (byte-level BPE) and on sentencepiece, old ids and
old-vocabulary logits unchanged, new rows the mean of their pieces, Spanish fertility cut; then a
continued run that first trains only the new rows, under every engine and across a resume."""
import bisect
import collections
import json
import re
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from cptrain.data_pipeline.tokenizer import load_tokenizer
from cptrain.data_pipeline.vocab import DEMO_ENGLISH, reference_sample
from cptrain.launch.cli import main as cli
from cptrain.launch.launchers import torchrun_command
from cptrain.model.hf import load_hf_dir
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import run
from tests.conftest import FIXTURES, tiny_overrides
from tests.multiproc import free_port, run_processes

pytestmark = pytest.mark.vocab
SPANISH = Path(__file__).resolve().parents[1] / "data_pipeline" / "demo" / "rv1909_nt.txt"  # the shipped Spanish text
ENGLISH = [json.loads(line)["text"] for line in (FIXTURES / "text" / "austen_pp.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def extended(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab") / "smollm2-es"
    assert cli(["vocab", "extend", "--model", str(smollm2_dir), "--corpus", str(SPANISH), "--add", "2000",
                "--out", str(out)]) == 0
    return out


def test_extension_keeps_old_ids_and_logits_and_cuts_fertility(smollm2_dir, extended):
    report = json.loads((extended / "vocab_extension.json").read_text())
    assert report["added"] == 2000 and report["first_new_id"] == 49152 and report["embedding_rows"] == 51200
    assert report["fertility_after"] <= 0.85 * report["fertility_before"], report  # measured 33% fewer tokens
    base, new = load_tokenizer(smollm2_dir), load_tokenizer(extended)
    assert base.encode_batch(ENGLISH) == new.encode_batch(ENGLISH)  # old ids unchanged; no new token fires in this text
    english = report["reference"]  # but some do in the built-in English sample, and the report says so
    assert english["source"].startswith("built-in English sample") and not english["protected"]
    assert 0 < english["tokens_changed"] < 0.001 * english["tokens_before"], english  # measured 4 of 14,054
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    hf_new = transformers.AutoModelForCausalLM.from_pretrained(extended).eval()
    assert type(hf_new).__name__ == "LlamaForCausalLM" and hf_new.config.vocab_size == 51200
    ids = torch.tensor([base.encode_batch(ENGLISH[:1])[0][:96]])
    with torch.no_grad():
        old, grown = hf_base(ids).logits, hf_new(ids).logits
    torch.testing.assert_close(grown[..., :49152], old, atol=1e-5, rtol=0)  # old rows untouched: same logits
    # Each new row is the mean of the base rows of its text's base tokens (decode, then encode).
    emb_base = load_file(str(smollm2_dir / "model.safetensors"))["model.embed_tokens.weight"]
    emb_new = load_file(str(extended / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(emb_new[:49152], emb_base)
    checked = 0
    for token_id in range(49152, 51152):
        text = new.decode([token_id])
        if "\ufffd" not in text:
            pieces = base.encode_plain(text)
            torch.testing.assert_close(emb_new[token_id], emb_base[pieces].mean(0), rtol=0, atol=1e-6)
            checked += 1
    assert checked > 1900
    torch.testing.assert_close(emb_new[51152:], emb_base.mean(0).expand(48, -1), rtol=0, atol=1e-6)  # padding rows


def test_kept_text_tokenizes_exactly_as_before(smollm2_dir, tmp_path):
    austen = Path(__file__).resolve().parents[1] / "data_pipeline" / "demo" / "austen.txt"
    out = tmp_path / "kept"
    assert cli(["vocab", "extend", "--model", str(smollm2_dir), "--corpus", str(SPANISH), "--add", "500",
                "--keep", str(austen), "--out", str(out)]) == 0
    text = austen.read_text()
    assert load_tokenizer(smollm2_dir).encode_batch([text]) == load_tokenizer(out).encode_batch([text])
    report = json.loads((out / "vocab_extension.json").read_text())["reference"]
    assert report["source"] == f"--keep {austen}" and report["protected"] and report["words_changed"] == 0


def test_bad_input_is_one_line_and_writes_nothing(smollm2_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    wordpiece = tmp_path / "wp"
    wordpiece.mkdir()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(ENGLISH, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "</s>"]))
    tok.save(str(wordpiece / "tokenizer.json"))
    (wordpiece / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "exists").mkdir()
    cases = [
        (["--model", str(smollm2_dir), "--tokenizer", str(wordpiece)], "a WordPiece tokenizer cannot be extended"),
        (["--model", str(smollm2_dir), "--corpus", str(tmp_path / "empty.txt")], "the corpus is empty"),
        (["--model", str(smollm2_dir), "--add", "0"], "--add 0: the number of new tokens must be positive"),
        (["--model", str(smollm2_dir), "--out", str(tmp_path / "exists")], "exists; pick a new --out"),
    ]
    for extra, message in cases:
        argv = {"--corpus": str(SPANISH), "--add": "10", "--out": str(tmp_path / "out")}
        flags = dict(zip(extra[::2], extra[1::2]))
        argv.update(flags)
        assert cli(["vocab", "extend", *[x for kv in argv.items() for x in kv]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out-*"))


# ---- sentencepiece, and the phases that train the new rows first ----
@pytest.fixture(scope="module")
def tiny_base(austen_data, tmp_path_factory) -> Path:
    """A tiny Llama (512 rows) pretrained 2 steps on English with the austen_data sentencepiece tokenizer."""
    base = tmp_path_factory.mktemp("tiny_base") / "base"
    run(load_config(None, tiny_overrides(base, austen_data, **{"train.max_tokens": 2048})))
    return base


@pytest.fixture(scope="module")
def tiny_extended(tiny_base, tmp_path_factory):
    """The tiny Llama's sentencepiece tokenizer extended on Spanish; the Spanish data prepared with the
    extended tokenizer."""
    root = tmp_path_factory.mktemp("tiny_vocab")
    assert cli(["vocab", "extend", "--model", str(tiny_base), "--corpus", str(SPANISH), "--add", "200",
                "--out", str(root / "hf")]) == 0
    assert cli(["data", "prepare", "--input", *map(str, sorted((FIXTURES / "text").glob("rv1909_*.txt"))),
                "--out", str(root / "es"), "--tokenizer", str(root / "hf"), "--seq-len", "64", "--val-fraction", "0.1",
                "--txt-split", "line"]) == 0
    return root


def test_sentencepiece_extension_keeps_the_old_pieces(tiny_extended, austen_data):
    report = json.loads((tiny_extended / "hf" / "vocab_extension.json").read_text())
    assert report["kind"] == "sentencepiece" and report["first_new_id"] == 512 and report["embedding_rows"] == 768
    assert report["fertility_after"] < 0.85 * report["fertility_before"]
    base, new = load_tokenizer(austen_data / "tokenizer.model"), load_tokenizer(tiny_extended / "hf")
    words = " ".join(ENGLISH).split()[:300]
    old_words = [w for w, ids in zip(words, base.encode_batch(words)) if len(ids) == 1]  # words the base has whole
    assert old_words and base.encode_batch(old_words) == new.encode_batch(old_words)
    assert json.loads((tiny_extended / "es" / "manifest.json").read_text())["tokenizer"]["vocab_size"] == 712


# ---- the old language after an extension: the reference sample, and protecting it ----
@pytest.fixture(scope="module")
def tiny_tokenizers(austen_data, tmp_path_factory) -> dict[str, Path]:
    """Two base tokenizers for the tiny Llama's 512 rows: a byte-level BPE tokenizer.json (400 tokens,
    as SmolLM2's) and the sentencepiece BPE model of austen_data, both trained on English."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("bytelevel")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(ENGLISH, trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return {"hf": folder, "sentencepiece": austen_data / "tokenizer.model"}


def _extend_tiny(tiny_base, tokenizer: Path, out: Path, *flags: str) -> dict:
    assert cli(["vocab", "extend", "--model", str(tiny_base), "--tokenizer", str(tokenizer), "--corpus", str(SPANISH),
                "--add", "100", "--out", str(out), *flags]) == 0
    return json.loads((out / "vocab_extension.json").read_text())


def _changes_from_offsets(kind: str, base_path: Path, new_path: Path, text: str, first_id: int) -> dict:
    """The reference numbers counted from each tokenizer's own encoding with offsets: a base token is
    changed when no token after covers the same span; a word (HF: the pre-tokenizer's; sentencepiece:
    a whitespace-separated word, with the word-boundary piece before it) when its tokens' spans differ."""
    if kind == "hf":
        from tokenizers import Tokenizer

        toks = [Tokenizer.from_file(str(p / "tokenizer.json")) for p in (base_path, new_path)]
        encodings = [t.encode(text, add_special_tokens=False) for t in toks]
        tokens = [list(zip(e.offsets, e.ids)) for e in encodings]  # character offsets
        word_ends = [end for _, (_, end) in toks[0].pre_tokenizer.pre_tokenize_str(text)]
        decode = lambda i: toks[1].decode([i])  # noqa: E731
    else:
        import sentencepiece as spm

        sps = [spm.SentencePieceProcessor(model_file=str(p)) for p in (base_path, new_path / "tokenizer.model")]
        tokens = [[((x.begin, x.end), x.id) for x in sp.encode(text, return_type="proto").pieces] for sp in sps]
        word_ends = [m.end() for m in re.finditer(rb"\S+", text.encode())]  # byte offsets, as sentencepiece's
        decode = lambda i: sps[1].decode([i])  # noqa: E731

    def by_word(toks) -> dict:  # a token is in the first word ending after its last character
        words = collections.defaultdict(collections.Counter)
        for (begin, end), _ in toks:
            words[bisect.bisect_right(word_ends, max(begin, end - 1))][(begin, end)] += 1
        return words
    before, after = by_word(tokens[0]), by_word(tokens[1])
    spans = [collections.Counter(span for span, _ in t) for t in tokens]
    return {"words": len(word_ends), "words_changed": sum(before[w] != after[w] for w in range(len(word_ends))),
            "tokens_before": len(tokens[0]), "tokens_after": len(tokens[1]),
            "tokens_changed": sum((spans[0] - spans[1]).values()),
            "new_tokens": [(decode(i), n) for i, n in collections.Counter(i for _, i in tokens[1] if i >= first_id).items()]}


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
def test_report_measures_the_builtin_english_sample(kind, tiny_base, tiny_tokenizers, tmp_path, capsys):
    report = _extend_tiny(tiny_base, tiny_tokenizers[kind], tmp_path / "out")
    text = reference_sample([], False).texts[0]
    want = _changes_from_offsets(kind, tiny_tokenizers[kind], tmp_path / "out", text, report["first_new_id"])
    got = report["reference"]
    assert got["source"].startswith("built-in English sample") and not got["protected"]
    assert {k: got[k] for k in want if k != "new_tokens"} == {k: v for k, v in want.items() if k != "new_tokens"}
    assert got["words_changed"] > 0 and got["chars"] == len(text)  # new tokens do fire in English
    assert got["tokens_changed_share"] == got["tokens_changed"] / got["tokens_before"]
    assert got["tokens_per_char_after"] == got["tokens_after"] / len(text) < got["tokens_per_char_before"]
    counts = sorted((n for _, n in want["new_tokens"]), reverse=True)
    assert [n for _, n in got["new_tokens"]] == counts[:10]  # the most frequent, with their counts
    assert all(tuple(pair) in want["new_tokens"] for pair in got["new_tokens"])
    line, rest = capsys.readouterr().out.strip().splitlines()[-2:]
    assert line.startswith("built-in English sample (") and "of its words tokenize differently" in line, line
    assert f"{got['new_tokens'][0][0]!r} x{got['new_tokens'][0][1]}" in line and "--protect-reference" in line
    assert rest.startswith("the rest of austen.txt (") and report["held_out"]["words_changed"] > 0


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
def test_protect_reference_leaves_the_sample_as_it_was(kind, tiny_base, tiny_tokenizers, tmp_path, capsys):
    report = _extend_tiny(tiny_base, tiny_tokenizers[kind], tmp_path / "out", "--protect-reference")
    text = reference_sample([], False).texts[0]
    base, new = load_tokenizer(tiny_tokenizers[kind]), load_tokenizer(tmp_path / "out")
    assert report["added"] == 100 and new.vocab_size == base.vocab_size + 100
    assert base.encode_batch([text]) == new.encode_batch([text])  # tokenizes exactly as before
    assert report["reference"]["protected"] and report["reference"]["words_changed"] == 0
    assert report["fertility_after"] < 0.9 * report["fertility_before"]  # and Spanish still gains
    held = report["held_out"]  # the rest of the English text is not protected: new tokens fire there
    assert not held["protected"] and held["words_changed"] > 0 and held["chars"] + len(text) == len(DEMO_ENGLISH.read_text())
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].endswith(f"(protected): tokenizes exactly as before ({report['reference']['tokens_before']:,} tokens)")
    assert lines[-1].startswith("the rest of austen.txt") and "tokenize differently" in lines[-1]


def _freeze_overrides(root: Path, run_dir: Path, **extra) -> list[str]:
    base = {"model.init_from": str(root / "hf"), "data.domains": f"[{{name: es, path: {root / 'es'}}}]",
            "train.max_tokens": 6144, "freeze.phases": "[{until_tokens: 3072, train: new_rows}]", "eval.at_start": False,
            "continual.report": "off"}
    return [o for o in tiny_overrides(run_dir, root / "es", **{**base, **extra})
            if not o.startswith(("--model.preset", "--model.vocab_size", "--model.max_seq_len"))]


def test_new_rows_train_alone_then_everything(tiny_extended, tmp_path):
    run_dir = tmp_path / "run"
    rows = run(load_config(None, _freeze_overrides(tiny_extended, run_dir, **{"checkpoint.interval_tokens": 1024,
                                                                             "checkpoint.keep_last": 10})))
    start = load_hf_dir(tiny_extended / "hf")[1]
    ckpts = run_dir / "checkpoints"
    at3 = load_file(str(ckpts / "step-00000003" / "model.safetensors"))  # the end of the first phase
    at6 = load_file(str(ckpts / "step-00000006" / "model.safetensors"))
    grown = ("tok_embeddings.weight", "output.weight")  # the tiny model is untied: the head has rows too
    for name in grown:
        assert torch.equal(at3[name][:512], start[name][:512])  # old rows held
        assert not torch.equal(at3[name][512:712], start[name][512:712])  # new rows learned
        assert not torch.equal(at6[name][:512], at3[name][:512])  # and then everything
    held = [k for k in at3 if k not in grown]
    assert held and all(torch.equal(at3[k], start[k]) for k in held)  # the rest of the model held still
    assert all(not torch.equal(at6[k], at3[k]) for k in held)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[2] < losses[0]


def test_freeze_survives_resume_and_runs_under_every_engine(tiny_extended, tmp_path):
    run_dir = tmp_path / "run"
    every = {"checkpoint.interval_tokens": 2048, "checkpoint.keep_last": 10}
    full = run(load_config(None, _freeze_overrides(tiny_extended, run_dir, **every)))
    root = run_dir / "checkpoints"
    for late in ("step-00000004", "step-00000006"):
        shutil.rmtree(root / late)
    (root / "latest").write_text("step-00000002\n")  # stopped inside the first phase
    resumed = run(load_config(None, _freeze_overrides(tiny_extended, run_dir, **every)), resume=True)
    curve = lambda rs: [(r["step"], r["loss"], r["grad_norm"]) for r in rs if "loss" in r]  # noqa: E731
    assert curve(resumed) == curve(full)[2:]
    # Two gloo ranks: DDP, ZeRO-2, ZeRO-3 and FSDP2 train the same as one process.
    engines = {"ddp": {}, "zero2": {"train.engine": "deepspeed", "deepspeed.zero_stage": 2},
               "zero3": {"train.engine": "deepspeed", "deepspeed.zero_stage": 3}, "fsdp2": {"train.engine": "fsdp2"}}
    jobs = [{"overrides": _freeze_overrides(tiny_extended, tmp_path / name, **{"train.device": "cpu", "train.precision": "fp32",
                                                                             "train.global_batch_tokens": 2048, **extra})}
            for name, extra in engines.items()]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    args = Namespace(nodes=1, gpus_per_node=2, hostfile=None, master_addr=None, master_port=free_port(), no_ssh=False,
                     node_rank=None)
    run_processes([torchrun_command(args, ["tests/dist_worker.py", str(tmp_path / "jobs.json")], tmp_path)], timeout=600)
    local = run(load_config(None, _freeze_overrides(tiny_extended, tmp_path / "one", **{"train.device": "cpu",
                                                                                        "train.global_batch_tokens": 2048})))
    want = [r["loss"] for r in local if "loss" in r]
    for name in engines:
        got = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)]
        assert got == pytest.approx(want, rel=1e-5), (name, got, want)
