"""Vocabulary extension for a new language: learn up to N new tokens on a corpus with the tokenizer's
own algorithm, appended after every existing one, so every old token keeps its id.

Both supported kinds are BPE, and extension is BPE training continued from the base tokenizer's
final state: the corpus is pre-tokenized and tokenized by the base tokenizer, then the most
frequent adjacent pair is merged, again and again, exactly as BPE training would have gone on.
The new merges rank after every base merge, so they act only on what the base tokenizer leaves
unmerged: a word it covers with one token tokenizes as before, but a word it splits may now take a
new token (`clam`, learned from Spanish `exclamó`, fires in English `exclamations`) whose row starts
as a mean and is trained on the new language. `tokenization_change` measures this on a sample of
the old language. A protected text (`--keep`, or the reference sample with `--protect-reference`)
tokenizes exactly as before: no new token is the join of two adjacent tokens of its base
tokenization, or one of its words whole.
  * HF `tokenizer.json` with a BPE model (byte-level as in Llama 3, Qwen, SmolLM2; or with byte
    fallback as in Gemma): vocabulary entries and merges appended (`tokenizers` reads it).
  * sentencepiece BPE `.model`: pieces appended to the model proto with scores below every
    existing one (sentencepiece merges by piece score, so they rank last too).
Unigram, WordPiece and word/char models have no merges to continue; they are refused.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .tokenizer import HF_TOKENIZER_FILES, HFTokenizer, SentencePieceTokenizer, load_tokenizer

DEMO_ENGLISH = Path(__file__).parent / "demo" / "austen.txt"
REFERENCE_CHARS = 60_000  # the built-in reference sample: the first chapters of Pride and Prejudice


@dataclass
class Extension:
    """What extend_tokenizer added: new ids are contiguous from `first_id`."""
    kind: str  # "hf" or "sentencepiece"
    base_vocab_size: int  # the base tokenizer's size (ids below `first_id` are untouched)
    first_id: int
    pieces: list[str]  # the new tokens, as the tokenizer stores them, in id order
    parts: list[list[int]]  # each new token's base-tokenizer ids (the pieces it was merged from)


@dataclass
class Reference:
    """A sample of the base language whose tokenization the extension report follows."""
    source: str  # what the sample is, for the report
    texts: list[str]
    protected: bool  # no new token may change how it tokenizes
    held_out: Reference | None = None  # more of the language, never protected: how far a protection reaches


def reference_sample(keep: list[str], protect: bool) -> Reference:
    """The `keep` files (always protected) or, without them, the built-in English sample: the first
    REFERENCE_CHARS characters of the shipped Austen text, cut at a line end, protected if `protect`,
    with the rest of the file held out (what protecting a sample does for other text)."""
    if keep:
        return Reference(f"--keep {' '.join(map(str, keep))}", read_corpus(list(keep)), True)
    text = DEMO_ENGLISH.read_text(encoding="utf-8")
    cut = text.rindex("\n", 0, REFERENCE_CHARS) + 1
    rest = Reference(f"the rest of {DEMO_ENGLISH.name} ({len(text) - cut:,} characters)", [text[cut:]], False)
    return Reference(f"built-in English sample ({cut:,} characters of {DEMO_ENGLISH.name})", [text[:cut]], protect, rest)


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
                 protected: set[str] = frozenset(), min_count: int = 2) -> list[tuple[str, str]]:
    """Up to n_merges merges (a, b) learned on `words` (tuple of tokens -> frequency) by greedy BPE:
    the most frequent adjacent pair, ties broken by the pair itself (deterministic). A merge whose
    result is already a token or one of the `protected` strings, or that involves a `banned` token
    (byte pieces), is never made."""
    words = [[list(w), c] for w, c in words.items()]
    counts: collections.Counter = collections.Counter()
    where: dict[tuple, set[int]] = collections.defaultdict(set)
    for i, (w, c) in enumerate(words):
        for pair in zip(w, w[1:]):
            counts[pair] += c
            where[pair].add(i)

    def usable(pair) -> bool:
        return (pair[0] not in banned and pair[1] not in banned and pair[0] + pair[1] not in vocab
                and pair[0] + pair[1] not in protected)
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


def _words(toks: list[HFTokenizer | SentencePieceTokenizer], texts: list[str]) -> list[list[tuple[str, ...]]]:
    """Every word of the texts in order, as the pieces of each tokenizer (a base tokenizer and its
    extensions: new merges never cross a word, so all split a text into the same words). HF: the
    pre-tokenizer's words (a word with its leading space, a run of punctuation), pre-tokenized once
    and tokenized by each model; sentencepiece: the pieces from one that starts with the
    word-boundary mark to the next."""
    if isinstance(toks[0], SentencePieceTokenizer):
        return [_sentencepiece_words(tok, texts) for tok in toks]
    engine, words = toks[0].tok, []
    for text in texts:
        if engine.normalizer is not None:
            text = engine.normalizer.normalize_str(text)
        pieces = engine.pre_tokenizer.pre_tokenize_str(text) if engine.pre_tokenizer is not None else [(text, None)]
        words.extend(word for word, _ in pieces)
    out = []
    for tok in toks:
        known = {word: tuple(t.value for t in tok.tok.model.tokenize(word)) for word in set(words)}
        out.append([known[word] for word in words])
    return out


def _sentencepiece_words(tok: SentencePieceTokenizer, texts: list[str]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for pieces in tok.sp.encode(list(texts), out_type=str):
        word: list[str] = []
        for piece in pieces:
            if piece.startswith("\u2581") and word:
                out.append(tuple(word))
                word = []
            word.append(piece)
        if word:
            out.append(tuple(word))
    return out


def _protected(words: list[tuple[str, ...]]) -> set[str]:
    """The texts no new token may have, so that `words` tokenize as before: each join of two adjacent
    pieces (sentencepiece merges any adjacent pair whose join is a piece, not only the learned pair)
    and each word whole (an HF BPE with `ignore_merges` takes a word that is a token whole)."""
    return {a + b for w in words for a, b in zip(w, w[1:])} | {"".join(w) for w in words if len(w) > 1}


def _hf_base(tok: HFTokenizer):
    """(its pieces, pieces never merged, a writer of the extended tokenizer) for a BPE tokenizer.json."""
    data = json.loads((tok.path / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{tok.path / 'tokenizer.json'}: a {model.get('type')} tokenizer cannot be extended (it has no merges "
                        "to continue); cptrain extends BPE tokenizer.json files and sentencepiece BPE models")
    vocab = model["vocab"]

    def write(merges: list[tuple[str, str]], out: Path) -> tuple[int, dict[str, int]]:
        first = max([*vocab.values(), *(t["id"] for t in data.get("added_tokens", []))]) + 1
        string_merges = bool(model["merges"]) and isinstance(model["merges"][0], str)
        for i, (a, b) in enumerate(merges):
            vocab[a + b] = first + i
            model["merges"].append(f"{a} {b}" if string_merges else [a, b])
        (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        for name in HF_TOKENIZER_FILES:
            if name != "tokenizer.json" and (tok.path / name).is_file():
                shutil.copy2(tok.path / name, out / name)
        return first, vocab
    byte_pieces = {p for p in vocab if p.startswith("<0x") and p.endswith(">") and len(p) == 6}
    return set(vocab), byte_pieces, write


def _sentencepiece_base(tok: SentencePieceTokenizer):
    """(its pieces, pieces never merged, a writer of the extended model) for a sentencepiece BPE model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        kind = pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise UserError(f"{tok.path}: a sentencepiece {kind} model cannot be extended (no merges to continue); "
                        "cptrain extends sentencepiece BPE models and BPE tokenizer.json files")
    normal = pb.ModelProto.SentencePiece.NORMAL

    def write(merges: list[tuple[str, str]], out: Path) -> tuple[int, dict[str, int]]:
        lowest, first = min(p.score for p in proto.pieces if p.type == normal), len(proto.pieces)
        for i, (a, b) in enumerate(merges):
            proto.pieces.add(piece=a + b, score=lowest - 1.0 - i, type=normal)
        (out / "tokenizer.model").write_bytes(proto.SerializeToString())
        return first, {p.piece: i for i, p in enumerate(proto.pieces)}
    never = {p.piece for p in proto.pieces if p.type != normal}  # byte, control and unknown pieces
    return {p.piece for p in proto.pieces}, never, write


def extend_tokenizer(tokenizer_path: str | Path, corpus: list[str], add: int, out: str | Path,
                     protect: list[str] = ()) -> Extension:
    """Extend the tokenizer at `tokenizer_path` (HF folder or sentencepiece .model) with up to `add`
    tokens learned on the corpus files, leaving the tokenization of the `protect` texts as it was;
    writes the extended tokenizer into `out`."""
    if add <= 0:
        raise UserError(f"--add {add}: the number of new tokens must be positive")
    tok = load_tokenizer(tokenizer_path)
    vocab, banned, write = (_hf_base if isinstance(tok, HFTokenizer) else _sentencepiece_base)(tok)
    words = collections.Counter(_words([tok], read_corpus(corpus))[0])
    merges = continue_bpe(words, add, vocab, banned, _protected(_words([tok], list(protect))[0]))
    Path(out).mkdir(parents=True, exist_ok=True)
    first, ids = write(merges, Path(out))
    made_of = {a + b: (a, b) for a, b in merges}
    pieces = [a + b for a, b in merges]
    return Extension(tok.kind, tok.vocab_size, first, pieces, [[ids[p] for p in _expand(x, made_of)] for x in pieces])


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


@dataclass
class TokenizationChange:
    """How a text of the base language tokenizes with the extended tokenizer, against the base one."""
    chars: int
    words: int  # as `_words` splits the text (HF: the pre-tokenizer's words; sentencepiece: whitespace-separated)
    words_changed: int
    tokens_before: int
    tokens_after: int
    tokens_changed: int  # base tokens that new tokens swallowed (no token covers the same text after)
    new_tokens: list[tuple[str, int]]  # the most frequent new tokens in the text, as text, with their counts

    def summary(self) -> dict:
        return {**dataclasses.asdict(self), "words_changed_share": self.words_changed / max(self.words, 1),
                "tokens_changed_share": self.tokens_changed / max(self.tokens_before, 1),
                "tokens_per_char_before": self.tokens_before / max(self.chars, 1),
                "tokens_per_char_after": self.tokens_after / max(self.chars, 1)}

    def describe(self) -> str:
        if not self.words_changed:
            return f"tokenizes exactly as before ({self.tokens_before:,} tokens)"
        s = self.summary()
        firing = ", ".join(f"{text!r} x{n}" for text, n in self.new_tokens[:5])
        return (f"{s['tokens_changed_share']:.3%} of its tokens and {s['words_changed_share']:.3%} of its words tokenize "
                f"differently; tokens per character {s['tokens_per_char_before']:.4f} -> {s['tokens_per_char_after']:.4f}; "
                f"new tokens firing in it: {firing}")


def _spans(pieces: tuple[str, ...]) -> set[tuple[int, int]]:
    """Where each piece starts and ends in the word's text."""
    ends = [0]
    for piece in pieces:
        ends.append(ends[-1] + len(piece))
    return set(zip(ends, ends[1:]))


def tokenization_change(ext: Extension, base_path: str | Path, extended_path: str | Path,
                        texts: list[str], top: int = 10) -> TokenizationChange:
    """Compare the texts' tokenization by the base and the extended tokenizer, word by word."""
    extended = load_tokenizer(extended_path)
    before, after = _words([load_tokenizer(base_path), extended], texts)
    new_ids = {piece: ext.first_id + i for i, piece in enumerate(ext.pieces)}
    changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    fired = collections.Counter(p for _, a in changed for p in a if p in new_ids)
    return TokenizationChange(
        chars=sum(map(len, texts)), words=len(before), words_changed=len(changed),
        tokens_before=sum(map(len, before)), tokens_after=sum(map(len, after)),
        tokens_changed=sum(len(_spans(b) - _spans(a)) for b, a in changed),
        new_tokens=[(extended.decode([new_ids[p]]), n) for p, n in fired.most_common(top)])
