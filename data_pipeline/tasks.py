"""Multiple-choice task files built from plain text, for when real benchmarks cannot be downloaded
(tests, the demo): a sentence's first half is the context, its real second half the answer, and
the distractors are that second half with two of its words swapped. A model that has learned the
language's word order prefers the real one. Items are JSON lines in the format of trainer/tasks.py.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path


def word_order_items(text: str, n_items: int, seed: int = 0, n_choices: int = 4, min_words: int = 10) -> list[dict]:
    """Up to n_items items from the sentences of `text` that have at least min_words words."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?;:])\s+", " ".join(text.split())) if len(s.split()) >= min_words]
    rng = random.Random(seed)
    rng.shuffle(sentences)
    items = []
    for sentence in sentences:
        words = sentence.split()
        half = len(words) // 2
        tail = words[half:]
        distractors = []
        for _ in range(20 * n_choices):
            i, j = sorted(rng.sample(range(len(tail)), 2))
            swapped = tail[:i] + [tail[j]] + tail[i + 1:j] + [tail[i]] + tail[j + 1:]
            if swapped != tail and " ".join(swapped) not in distractors:
                distractors.append(" ".join(swapped))
            if len(distractors) == n_choices - 1:
                break
        if len(distractors) < n_choices - 1:
            continue  # too many repeated words to make distinct distractors
        answer = rng.randrange(n_choices)
        choices = [" " + d for d in distractors]
        choices.insert(answer, " " + " ".join(tail))
        items.append({"context": " ".join(words[:half]), "choices": choices, "answer": answer})
        if len(items) == n_items:
            break
    return items


def write_task(items: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    return path
