"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"): a number hidden at a given depth
of filler text, asked for at the end; and a multi-key variant after RULER's niah_multikey (Hsieh et
al. 2024): several numbers, each under its own name, one of them asked for.

A prompt of length L is exactly L tokens of the model's own tokenizer: [BOS] intro, filler, the
needle at `depth` (the fraction of the filler before it), the rest of the filler, the question, and
the key's tokens. The filler is the paper's five sentences repeated, cut at a token boundary: being
the same everywhere it carries no information, so the key is the only thing to find. A prompt is
scored by greedy exact match: the model, reading the prompt, must predict every token of the key as
its argmax. That is greedy decoding of as many tokens as the key needs, checked in one forward with
the key appended (lm-evaluation-harness's `is_greedy`); an answer spelled in other tokens than the
tokenizer's own spelling of " <key>" counts as a miss. Prompts are seeded by (seed, kind, length,
depth, trial), so every run and every rank builds the same ones.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from ..errors import UserError
from . import tasks as T
from .addons import AddOn

# Mohtashami & Jaggi 2023 (Landmark Attention, its passkey prompt), word for word.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass(frozen=True)
class Template:
    intro: str
    needle: str  # {key}, {name}
    question: str  # {name}; the key follows it after a space
    digits: int  # of each key


TEMPLATES = {
    "single": Template(  # Mohtashami & Jaggi 2023; keys of 5 digits (theirs: 1 to 50,000)
        intro="There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
              "I will quiz you about the important information there.",
        needle="The pass key is {key}. Remember it. {key} is the pass key.",
        question="What is the pass key? The pass key is",
        digits=5),
    "multikey": Template(  # after RULER's niah_multikey template (Hsieh et al. 2024); 7-digit values as theirs
        intro="Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.",
        needle="One of the special magic numbers for {name} is: {key}.",
        question="What is the special magic number for {name} mentioned in the provided text? "
                 "The special magic number for {name} mentioned in the provided text is",
        digits=7),
}
# The names of multikey needles (RULER draws random words); each prompt takes distinct ones.
NAMES = ("apple", "river", "candle", "garden", "violin", "harbor", "pepper", "falcon", "marble", "lantern",
         "meadow", "copper", "saddle", "orchid", "tunnel", "walnut", "beacon", "glacier", "kettle", "mirror",
         "pillow", "quartz", "ribbon", "timber")
ANCHOR = "Here we go."  # what every piece after the intro is tokenized after: a sentence's end and a space


@dataclass
class PasskeyConfig:
    lengths: list[int] = field(default_factory=list)  # prompt lengths in tokens, each <= model.max_seq_len; empty: off
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # the key's place in the filler: 0 first, 1 last
    trials: int = 4  # prompts per length and depth, each with its own key
    kind: Literal["single", "multikey"] = "single"  # one pass key, or `keys` named numbers (one asked for)
    keys: int = 4  # multikey: needles per prompt (RULER's niah_multikey_1: 4)
    seed: int = 0
    batch_size: int = 1  # prompts per forward

    def check(self, max_seq_len: int, where: str) -> None:
        """Bad values, and lengths the model cannot read, in one line each (before any model work)."""
        if any(n <= 0 for n in self.lengths) or self.trials < 1 or self.batch_size < 1:
            raise UserError(f"{where}: lengths, trials and batch_size must be positive")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise UserError(f"{where}: depths {self.depths} must be fractions in [0, 1] (0: first, 1: last)")
        if self.kind == "multikey" and not 2 <= self.keys <= len(NAMES):
            raise UserError(f"{where}: keys={self.keys}: a multikey prompt holds 2 to {len(NAMES)} needles")
        if too_long := [n for n in self.lengths if n > max_seq_len]:
            raise UserError(f"{where}: length {too_long[0]} exceeds the model's max_seq_len {max_seq_len}; "
                            "drop it or extend the model's window (model.extend)")


@dataclass
class Prompt:
    ids: list[int]  # the whole prompt, key included: `length` tokens
    n_key: int  # the last n_key ids are the key's
    key: str
    needle_at: int  # index of the asked needle's first token in ids
    filler_before: int  # filler tokens before it (the sentence boundary nearest the asked depth)
    filler: int  # filler tokens in the prompt


def _after(tokenizer, context: str, text: str) -> list[int]:
    """The ids of `text` as it tokenizes following `context` and a space."""
    ctx, whole = tokenizer.encode_plain(context), tokenizer.encode_plain(f"{context} {text}")
    if whole[:len(ctx)] != ctx:
        raise UserError(f"{tokenizer.path}: the tokenizer joins {context!r} with the text after it; "
                        "passkey prompts need pieces that tokenize apart at a sentence's end")
    return whole[len(ctx):]


def filler_sentences(tokenizer) -> list[list[int]]:
    """The filler's sentences, each as it tokenizes after another."""
    return [_after(tokenizer, ANCHOR, x + ".") for x in FILLER.rstrip(".").split(". ")]


def haystack(sentences: list[list[int]], n: int) -> tuple[list[int], list[int]]:
    """(n filler tokens, the offsets between its sentences, 0 and n included): whole sentences in turn,
    the surplus cut from the front of the first, so that every needle sits between whole sentences."""
    ids, ends = [], []
    while len(ids) < n:
        ids += sentences[len(ends) % len(sentences)]
        ends.append(len(ids))
    cut = len(ids) - n
    return ids[cut:], [0] + [e - cut for e in ends if e > cut]


def build_prompt(tokenizer, sentences: list[list[int]], length: int, depth: float, rng: random.Random,
                 kind: str = "single", keys: int = 4) -> Prompt:
    """One prompt of exactly `length` tokens with the asked needle at the sentence boundary nearest
    `depth` of the filler and, for multikey, keys - 1 other needles at random boundaries."""
    t = TEMPLATES[kind]
    n = keys if kind == "multikey" else 1
    values = rng.sample(range(10 ** (t.digits - 1), 10 ** t.digits), n)
    names = rng.sample(NAMES, n) if kind == "multikey" else [""]
    needles = [_after(tokenizer, ANCHOR, t.needle.format(key=v, name=m)) for v, m in zip(values, names)]
    question = t.question.format(name=names[0])
    head = list(getattr(tokenizer, "prefix", [])) + tokenizer.encode_plain(t.intro)
    tail = _after(tokenizer, ANCHOR, question)
    answer = _after(tokenizer, question, str(values[0]))
    room = length - len(head) - sum(map(len, needles)) - len(tail) - len(answer)
    if room < 0:
        raise UserError(f"passkey length {length} is shorter than the prompt without filler "
                        f"({length - room} tokens with this tokenizer); ask for {length - room} or more")
    filler, bounds = haystack(sentences, room)
    asked = min(bounds, key=lambda b: abs(b - depth * room))
    # (offset in the filler, order, needle): the asked needle first among equal offsets
    places = sorted([(asked, 0, needles[0])] + [(rng.choice(bounds), 1, x) for x in needles[1:]], key=lambda p: p[:2])
    ids, done, at = list(head), 0, 0
    for offset, order, needle in places:
        ids += filler[done:offset]
        at = len(ids) if order == 0 else at
        ids += needle
        done = offset
    ids += filler[done:] + tail + answer
    return Prompt(ids, len(answer), str(values[0]), at, asked, room)


@dataclass
class Suite:
    """Every prompt of a passkey config, as scoring requests, and the (length, depth) of each."""
    cfg: PasskeyConfig
    cells: list[tuple[int, float]]
    requests: list[T.Request]


def build_suite(cfg: PasskeyConfig, tokenizer) -> Suite:
    sentences = filler_sentences(tokenizer)
    cells, requests = [], []
    for length in cfg.lengths:
        for depth in cfg.depths:
            for trial in range(cfg.trials):
                rng = random.Random(f"{cfg.seed}-{cfg.kind}-{length}-{depth}-{trial}")
                p = build_prompt(tokenizer, sentences, length, depth, rng, cfg.kind, cfg.keys)
                cells.append((length, depth))
                requests.append(T.Request(len(requests), 0, p.ids, p.n_key))
    return Suite(cfg, cells, requests)


def summarize(suite: Suite, scores: list[tuple[float, bool]]) -> dict:
    """{length: {"acc": mean over depths and trials, "n", "depths": {depth: acc}}} (keys as strings)."""
    hits: dict[int, dict[float, list[bool]]] = {}
    for (length, depth), (_, greedy) in zip(suite.cells, scores):
        hits.setdefault(length, {}).setdefault(depth, []).append(greedy)
    out = {}
    for length, by_depth in hits.items():
        every = [h for hs in by_depth.values() for h in hs]
        out[str(length)] = {"acc": sum(every) / len(every), "n": len(every),
                            "depths": {f"{d:g}": sum(hs) / len(hs) for d, hs in by_depth.items()}}
    return out


def metrics_row(result: dict) -> dict:
    """`eval/passkey/<length>` and `eval/passkey/<length>/<depth>` of a summarize() result."""
    row = {}
    for length, r in result.items():
        row[f"eval/passkey/{length}"] = r["acc"]
        row.update({f"eval/passkey/{length}/{d}": acc for d, acc in r["depths"].items()})
    return row


class PasskeyEval(AddOn):
    """eval.passkey: the prompts built once with the tokenizer the data was prepared with, scored at
    every evaluation over all ranks (each scores a share, as tasks are)."""

    def __init__(self, cfg: PasskeyConfig, tokenizer_file, engine):
        from ..data_pipeline.tokenizer import load_tokenizer

        self.suite, self.engine = build_suite(cfg, load_tokenizer(tokenizer_file)), engine

    def evaluate(self) -> dict:
        scores = T.score_task(self.engine.model, self.suite.requests, self.suite.cfg.batch_size, self.engine.spec.layout.device)
        return metrics_row(summarize(self.suite, scores))
