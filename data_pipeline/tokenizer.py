"""Tokenizers: train a sentencepiece model, or load one (a sentencepiece `.model`, or an HF
tokenizer folder so continual pretraining keeps the model's own vocabulary).

Both kinds present the same small surface: `encode_batch`, `vocab_size`, `eos_id`, `identity()`,
and `save_to(dir)` (the copy a prepared data directory carries). A document is encoded as the
tokenizer's own template begins it (an HF tokenizer whose post-processor puts a BOS first, as
Gemma's and Llama 3's do, gets its BOS: continued pretraining sees documents as the model was
trained on them; Gemma's loss without it is far higher), and `prepare` appends `eos_id` after it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..errors import UserError

# The files of an HF tokenizer folder that define its encoding (hashed for identity, copied along).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "tokenizer.model")


def _sha256(paths: list[Path]) -> str:
    """One file: the plain sha256 of its bytes (comparable with `sha256sum`, whatever the file is
    called). Several (an HF folder): each standard file name and its bytes, in name order."""
    h = hashlib.sha256()
    if len(paths) == 1:
        h.update(paths[0].read_bytes())
        return h.hexdigest()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike, num_threads: int = -1):
        import sentencepiece as spm
        self.path = Path(model_file)
        # encode_batch runs on num_threads threads (-1: all cores).
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path), num_threads=num_threads)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise UserError(f"{self.path}: this sentencepiece model has no EOS piece; "
                            "train one with an eos_id (cptrain does) or pass an HF tokenizer folder")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def encode_plain(self, text: str) -> list[int]:
        """The ids of a text alone, without what begins a document."""
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def identity(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "sha256": _sha256([self.path])}

    def save_to(self, out_dir: str | os.PathLike) -> str:
        """Copy the model into `out_dir`; returns its name relative to `out_dir`."""
        dest = Path(out_dir) / "tokenizer.model"
        if not (dest.exists() and dest.samefile(self.path)):
            shutil.copyfile(self.path, dest)
        return "tokenizer.model"


class HFTokenizer:
    """A `tokenizer.json` folder, read with `tokenizers` (no hub access)."""
    kind = "hf"

    def __init__(self, folder: str | os.PathLike):
        from tokenizers import Tokenizer
        self.path = Path(folder)
        self.tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos()
        self.prefix = self._template_prefix()

    def _template_prefix(self) -> list[int]:
        """The ids the tokenizer's post-processor puts before a text (its BOS, if it adds one)."""
        plain = self.tok.encode("a", add_special_tokens=False).ids
        full = self.tok.encode("a", add_special_tokens=True).ids
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                return full[:i]
        return []

    def _find_eos(self) -> int:
        cfg_file = self.path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        eos = cfg.get("eos_token")
        if isinstance(eos, dict):  # older configs store an AddedToken dict
            eos = eos.get("content")
        candidates = [eos] if eos else ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"]
        for token in candidates:
            tid = self.tok.token_to_id(token)
            if tid is not None:
                return tid
        raise UserError(f"{cfg_file}: no EOS token found (looked for {candidates}); "
                        "set \"eos_token\" in tokenizer_config.json")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.prefix + e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_plain(self, text: str) -> list[int]:
        """The ids of a text alone, without what begins a document."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def _files(self) -> list[Path]:
        return [self.path / n for n in HF_TOKENIZER_FILES if (self.path / n).exists()]

    def identity(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "bos_ids": self.prefix,
                "sha256": _sha256(self._files())}

    def save_to(self, out_dir: str | os.PathLike) -> str:
        dest = Path(out_dir) / "tokenizer"
        dest.mkdir(parents=True, exist_ok=True)
        for f in self._files():
            if not ((dest / f.name).exists() and (dest / f.name).samefile(f)):
                shutil.copyfile(f, dest / f.name)
        return "tokenizer"


Tokenizer = SentencePieceTokenizer | HFTokenizer


def load_tokenizer(path: str | os.PathLike, num_threads: int = -1) -> Tokenizer:
    """A sentencepiece `.model` file, or a folder with `tokenizer.json` (HF) or `tokenizer.model`.
    num_threads bounds sentencepiece's encoding threads (-1: all cores); HF tokenizers follow
    TOKENIZERS_PARALLELISM / RAYON_NUM_THREADS instead."""
    p = Path(path)
    if p.is_file():
        return SentencePieceTokenizer(p, num_threads)
    if (p / "tokenizer.json").exists():
        return HFTokenizer(p)
    if (p / "tokenizer.model").exists():
        return SentencePieceTokenizer(p / "tokenizer.model", num_threads)
    raise UserError(f"{p}: not a tokenizer; pass a sentencepiece .model file or a folder "
                    "with tokenizer.json (HF) or tokenizer.model")


# sentencepiece's trained pieces depend on its thread count (work is split per thread), so
# training uses a fixed count: the same text gives the same vocabulary on any machine. (The
# .model file also records the training paths, so its bytes and sha256 differ per directory.)
TRAIN_THREADS = 8


def train_sentencepiece(text_file: str | os.PathLike, out_file: str | os.PathLike, vocab_size: int,
                        model_type: str = "bpe", num_threads: int = TRAIN_THREADS) -> SentencePieceTokenizer:
    """Train on a text file (one sentence/line per line) and write `out_file` (a `.model`).

    byte_fallback keeps every input encodable (unknown characters become byte pieces), so a
    tokenizer trained on English still encodes a later domain without <unk>.
    """
    import sentencepiece as spm
    out_file = Path(out_file)
    prefix = str(out_file.with_suffix(""))
    try:
        spm.SentencePieceTrainer.train(
            input=str(text_file), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=0.9995, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            max_sentence_length=16384, num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
        raise UserError(f"{text_file}: sentencepiece training failed ({e}); "
                        "pick a smaller --train-tokenizer vocabulary or give more text") from e
    Path(prefix + ".vocab").unlink(missing_ok=True)
    if Path(prefix + ".model") != out_file:
        os.replace(prefix + ".model", out_file)
    return SentencePieceTokenizer(out_file)
