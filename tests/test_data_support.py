"""Helpers shared by the data tests (no tests here): prepare real fixture text into MDS folders."""
from pathlib import Path

from cptrain.data_pipeline import prepare
from cptrain.launch.cli import build_parser

FIXTURES = Path(__file__).parent / "fixtures" / "text"
AUSTEN = [str(FIXTURES / "austen_pp.jsonl"), str(FIXTURES / "austen_persuasion.jsonl")]
SPANISH = str(FIXTURES / "rv1909_*.txt")


def prepare_args(inputs, out, *extra):
    """Parse exactly what `cptrain data prepare` would get on the command line."""
    argv = ["data", "prepare", "--input", *map(str, inputs), "--out", str(out), *map(str, extra)]
    return build_parser().parse_args(argv)


def run_prepare(inputs, out, *extra) -> dict:
    return prepare.run(prepare_args(inputs, out, *extra))


def make_domains(root: Path, seq_len: int = 32) -> dict[str, Path]:
    """Two prepared domains (English Austen, Spanish RV1909) sharing one trained tokenizer."""
    en, es = root / "en", root / "es"
    run_prepare(AUSTEN, en, "--train-tokenizer", 800, "--seq-len", seq_len, "--val-fraction", 0.2)
    run_prepare([SPANISH], es, "--tokenizer", en / "tokenizer.model", "--seq-len", seq_len,
                "--val-fraction", 0.34, "--txt-split", "document")
    return {"en": en, "es": es}
