"""Vocabulary extension for a new language: learn up to N new tokens on a corpus with the tokenizer's
own algorithm, appended after every existing one, so every old token keeps its id.

Both supported kinds are BPE, and extension is BPE training continued from the base tokenizer's
final state: the corpus is pre-tokenized and tokenized by the base tokenizer, then the most
frequent adjacent pair is merged, again and again, exactly as BPE training would have gone on.
The new merges rank after every base merge, so they act only on what the base tokenizer leaves
unmerged: a text the base tokenizer covers with whole tokens (a word it already has) tokenizes as
before. Texts given as `keep` (a sample of the old language) tokenize exactly as before: no merge
is made of a pair that occurs in their base tokenization, so no new token can form in them.
  * HF `tokenizer.json` with a BPE model (byte-level as in Llama 3, Qwen, SmolLM2; or with byte
    fallback as in Gemma): vocabulary entries and merges appended (`tokenizers` reads it).
  * sentencepiece BPE `.model`: pieces appended to the model proto with scores below every
    existing one (sentencepiece merges by piece score, so they rank last too).
Unigram, WordPiece and word/char models have no merges to continue; they are refused.
"""
from __future__ import annotations

import collections
import heapq
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .tokenizer import HF_TOKENIZER_FILES, HFTokenizer, SentencePieceTokenizer, load_tokenizer


@dataclass
class Extension:
    """What extend_tokenizer added: new ids are contiguous from `first_id`."""
    kind: str  # "hf" or "sentencepiece"
    base_vocab_size: int  # the base tokenizer's size (ids below `first_id` are untouched)
    first_id: int
    pieces: list[str]  # the new tokens, as the tokenizer stores them, in id order
    parts: list[list[int]]  # each new token's base-tokenizer ids (the pieces it was merged from)


def read_corpus(files: list[str]) -> list[str]:
    """Texts of the corpus files: .txt whole, .jsonl/.json one `text` field a line."""
    texts = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"{path}: corpus file not found; pass .txt or .jsonl files")
        if path.suffix in (".jsonl", ".json"):
            for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if line.strip():
                    try:
                        texts.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise UserError(f"{path}:{n}: not a JSON object with a 'text' field; fix the line") from None
        else:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    if not any(t.strip() for t in texts):
        raise UserError(f"{' '.join(files)}: the corpus is empty; give text in the new language")
    return texts


def continue_bpe(words: collections.Counter, n_merges: int, vocab: set[str], banned: set[str],
                 kept_pairs: set = frozenset(), min_count: int = 2) -> list[tuple[str, str]]:
    """Up to n_merges merges (a, b) learned on `words` (tuple of tokens -> frequency) by greedy BPE:
    the most frequent adjacent pair, ties broken by the pair itself (deterministic). A merge whose
    result is already a token, that involves a `banned` token (byte pieces), or that is one of
    `kept_pairs`, is never made."""
    words = [[list(w), c] for w, c in words.items()]
    counts: collections.Counter = collections.Counter()
    where: dict[tuple, set[int]] = collections.defaultdict(set)
    for i, (w, c) in enumerate(words):
        for pair in zip(w, w[1:]):
            counts[pair] += c
            where[pair].add(i)

    def usable(pair) -> bool:
        return (pair[0] not in banned and pair[1] not in banned and pair[0] + pair[1] not in vocab
                and pair not in kept_pairs)
    heap = [(-c, p) for p, c in counts.items() if usable(p)]
    heapq.heapify(heap)
    merges = []
    while heap and len(merges) < n_merges:
        neg, pair = heapq.heappop(heap)
        if -neg != counts.get(pair, 0) or not usable(pair):
            continue  # a stale entry: the count changed since it was pushed
        if -neg < min_count:
            break
        merged = pair[0] + pair[1]
        merges.append(pair)
        vocab.add(merged)
        touched = set()
        for i in list(where[pair]):
            w, c = words[i]
            j, out = 0, []
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            for p in zip(w, w[1:]):
                counts[p] -= c
                touched.add(p)
            for p in zip(out, out[1:]):
                counts[p] += c
                where[p].add(i)
                touched.add(p)
            words[i][0] = out
        for p in touched:
            if counts[p] > 0 and usable(p):
                heapq.heappush(heap, (-counts[p], p))
    return merges


def _expand(piece: str, made_of: dict[str, tuple[str, str]]) -> list[str]:
    """The base pieces a new piece was merged from."""
    if piece not in made_of:
        return [piece]
    a, b = made_of[piece]
    return _expand(a, made_of) + _expand(b, made_of)


def _pairs(words) -> set:
    return {pair for w in words for pair in zip(w, w[1:])}


def _extend_hf(tok: HFTokenizer, texts: list[str], add: int, out: Path, keep: list[str]) -> Extension:
    data = json.loads((tok.path / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{tok.path / 'tokenizer.json'}: a {model.get('type')} tokenizer cannot be extended (it has no merges "
                        "to continue); cptrain extends BPE tokenizer.json files and sentencepiece BPE models")
    engine = tok.tok
    vocab = model["vocab"]

    def tokenized(texts: list[str]) -> collections.Counter:
        """The base tokenization of every pre-tokenized word of `texts`, with frequencies."""
        words: collections.Counter = collections.Counter()
        for text in texts:
            if engine.normalizer is not None:
                text = engine.normalizer.normalize_str(text)
            pieces = engine.pre_tokenizer.pre_tokenize_str(text) if engine.pre_tokenizer is not None else [(text, None)]
            words.update(piece for piece, _ in pieces)
        return collections.Counter({tuple(t.value for t in engine.model.tokenize(w)): c for w, c in words.items()})
    byte_pieces = {p for p in vocab if p.startswith("<0x") and p.endswith(">") and len(p) == 6}
    merges = continue_bpe(tokenized(texts), add, set(vocab), byte_pieces, _pairs(tokenized(keep)))
    first = max([*vocab.values(), *(t["id"] for t in data.get("added_tokens", []))]) + 1
    made_of = {a + b: (a, b) for a, b in merges}
    pieces = [a + b for a, b in merges]
    string_merges = bool(model["merges"]) and isinstance(model["merges"][0], str)
    for i, (a, b) in enumerate(merges):
        vocab[a + b] = first + i
        model["merges"].append(f"{a} {b}" if string_merges else [a, b])
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    for name in HF_TOKENIZER_FILES:
        if name != "tokenizer.json" and (tok.path / name).is_file():
            shutil.copy2(tok.path / name, out / name)
    parts = [[vocab[p] for p in _expand(piece, made_of)] for piece in pieces]
    return Extension("hf", tok.vocab_size, first, pieces, parts)


def _extend_sentencepiece(tok: SentencePieceTokenizer, texts: list[str], add: int, out: Path, keep: list[str]) -> Extension:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        kind = pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise UserError(f"{tok.path}: a sentencepiece {kind} model cannot be extended (no merges to continue); "
                        "cptrain extends sentencepiece BPE models and BPE tokenizer.json files")
    def tokenized(texts: list[str]) -> collections.Counter:
        """Words (runs of pieces from one starting with the word-boundary mark) with frequencies."""
        words: collections.Counter = collections.Counter()
        for text in texts:
            word: list[str] = []
            for piece in tok.sp.encode(text, out_type=str):
                if piece.startswith("\u2581") and word:
                    words[tuple(word)] += 1
                    word = []
                word.append(piece)
            if word:
                words[tuple(word)] += 1
        return words
    normal = {p.piece for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL}
    banned = {p.piece for p in proto.pieces} - normal  # byte, control and unknown pieces are never merged
    merges = continue_bpe(tokenized(texts), add, {p.piece for p in proto.pieces}, banned, _pairs(tokenized(keep)))
    lowest = min(p.score for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL)
    first = len(proto.pieces)
    made_of = {a + b: (a, b) for a, b in merges}
    for i, (a, b) in enumerate(merges):
        proto.pieces.add(piece=a + b, score=lowest - 1.0 - i, type=pb.ModelProto.SentencePiece.NORMAL)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    pieces = [a + b for a, b in merges]
    return Extension("sentencepiece", tok.vocab_size, first, pieces, [[ids[p] for p in _expand(x, made_of)] for x in pieces])


def extend_tokenizer(tokenizer_path: str | Path, corpus: list[str], add: int, out: str | Path,
                     keep: list[str] = ()) -> Extension:
    """Extend the tokenizer at `tokenizer_path` (HF folder or sentencepiece .model) with up to `add`
    tokens learned on the corpus files, leaving the tokenization of the `keep` files as it was;
    writes the extended tokenizer into `out`."""
    if add <= 0:
        raise UserError(f"--add {add}: the number of new tokens must be positive")
    tok = load_tokenizer(tokenizer_path)
    texts, kept = read_corpus(corpus), read_corpus(list(keep)) if keep else []
    out = Path(out)
    if isinstance(tok, HFTokenizer):
        return _extend_hf(tok, texts, add, out, kept)
    return _extend_sentencepiece(tok, texts, add, out, kept)


def fertility(tokenizer_path: str | Path, texts: list[str]) -> float:
    """Tokens per character of the texts (documents encoded as `cptrain data prepare` does)."""
    tok = load_tokenizer(tokenizer_path)
    chars = sum(len(t) for t in texts)
    return sum(len(ids) for ids in tok.encode_batch(texts)) / max(chars, 1)


def piece_ids(ext: Extension, base_path: str | Path, extended_path: str | Path) -> list[list[int]]:
    """For each new token, the base tokenizer's ids of its text (decode([id]) encoded without special
    tokens): the rows its embedding starts from. A token that is not whole UTF-8 on its own (a
    byte-level piece of a multi-byte character) has no text; it starts from the base pieces it
    was merged from."""
    base, extended = load_tokenizer(base_path), load_tokenizer(extended_path)
    out = []
    for i, merged_from in enumerate(ext.parts):
        text = extended.decode([ext.first_id + i])
        ids = [] if "\ufffd" in text else base.encode_plain(text)
        out.append(ids or merged_from)
    return out
