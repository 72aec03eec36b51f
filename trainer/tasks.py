"""Multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness scores them.

A task file is JSON lines `{"context": str, "choices": [str, ...], "answer": int}`. A choice's
tokens are those of encode(context + choice) after the tokens of encode(context) (whitespace that
ends the context moves to the choice, as lm-evaluation-harness does); its score is the summed
log-probability of those tokens. `acc` picks the highest score, `acc_norm` the highest score per
character of the choice. Few-shot examples (context + correct choice + a blank line) are drawn
from the same file, seeded per item, never the item itself. Every choice of every item is one
request; requests are scored in padded batches, one forward each, longest first.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import UserError
from . import collectives as cc
from .addons import AddOn

FEWSHOT_DELIMITER = "\n\n"


@dataclass
class TaskConfig:
    name: str = ""  # metrics are eval/<name>/acc and eval/<name>/acc_norm; empty: the file's stem
    path: str = ""  # a JSON lines task file
    num_fewshot: int = 0  # examples from the same file before each item
    max_items: int = 0  # score the first this many items; 0: all
    role: Literal["", "old", "new"] = ""  # in the forgetting report: a task that must not be forgotten (old) or the target (new)
    seed: int = 1234  # few-shot sampling (lm-evaluation-harness's default fewshot seed)

    @property
    def stem(self) -> str:
        return self.name or Path(self.path).stem


@dataclass
class Item:
    context: str
    choices: list[str]
    answer: int


@dataclass
class Request:
    item: int
    choice: int
    ids: list[int]  # the scored window: context (with few-shot examples) and the choice
    n_choice: int  # the last n_choice tokens of `ids` are the choice's


def load_items(path: str | Path, max_items: int = 0) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: task file not found; pass a JSON lines file of context/choices/answer items")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg}); fix the line") from None
        if not isinstance(row, dict) or "answer" not in row or "choices" not in row or "context" not in row:
            raise UserError(f'{where}: an item needs "context", "choices" and "answer"; this line lacks '
                            f"{sorted({'context', 'choices', 'answer'} - set(row if isinstance(row, dict) else []))}")
        choices, answer = row["choices"], row["answer"]
        if not isinstance(row["context"], str) or not isinstance(choices, list) or not choices \
                or not all(isinstance(c, str) for c in choices):
            raise UserError(f'{where}: "context" must be a string and "choices" a non-empty list of strings')
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise UserError(f'{where}: "answer" {answer!r} is out of range for {len(choices)} choices (0-based)')
        items.append(Item(row["context"], choices, answer))
        if max_items and len(items) == max_items:
            break
    if not items:
        raise UserError(f"{path}: the task file is empty")
    return items


def _pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness's _encode_pair computes them."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tokenizer.encode_plain(context + continuation), tokenizer.encode_plain(context)
    return ctx, whole[len(ctx):]


def build_requests(items: list[Item], tokenizer, num_fewshot: int = 0, seed: int = 1234,
                   max_len: int = 4096) -> list[Request]:
    """Every choice of every item as one request over the tokenizer, windows cut to max_len + 1 from the left."""
    if num_fewshot and num_fewshot >= len(items):
        raise UserError(f"num_fewshot {num_fewshot} needs more than {num_fewshot} items in the task file (it has {len(items)})")
    start = list(getattr(tokenizer, "prefix", [])) or []
    out = []
    for i, item in enumerate(items):
        shots = ""
        if num_fewshot:
            pool = [j for j in range(len(items)) if j != i]
            picks = random.Random(f"{seed}-{i}").sample(pool, num_fewshot)
            shots = "".join(items[j].context + items[j].choices[items[j].answer] + FEWSHOT_DELIMITER for j in picks)
        for c, choice in enumerate(item.choices):
            ctx, cont = _pair(tokenizer, shots + item.context, choice)
            if not cont:
                raise UserError(f"item {i} choice {c}: {choice!r} adds no token to its context; give choices with text")
            ids = (start + ctx or [tokenizer.eos_id]) + cont  # an empty context is scored after the end-of-text token
            out.append(Request(i, c, ids[-(max_len + 1):], len(cont)))
    return out


@torch.no_grad()
def loglikelihoods(model, requests: list[Request], batch_size: int, device: torch.device,
                   progress: bool = False) -> list[tuple[float, bool]]:
    """(summed log-probability of the choice tokens, whether each is the argmax) of every request;
    batches padded on the right (causal attention never sees the padding). The head runs only over
    the positions from the earliest scored one on (passkey prompts: the answer's few tokens)."""
    from tqdm import tqdm

    order = sorted(range(len(requests)), key=lambda k: -len(requests[k].ids))
    out = [(0.0, False)] * len(requests)
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", disable=not progress):
        chunk = [requests[k] for k in order[start:start + batch_size]]
        width = max(len(r.ids) for r in chunk) - 1
        tokens = torch.zeros(len(chunk), width + 1, dtype=torch.long)
        for row, r in enumerate(chunk):
            tokens[row, :len(r.ids)] = torch.tensor(r.ids)
        tokens = tokens.to(device)
        # the earliest scored position (0 at least: a choice with no context before it has no
        # prediction for its first token)
        first = max(0, min(len(r.ids) - 1 - r.n_choice for r in chunk))
        logprobs = F.log_softmax(model(tokens[:, :-1], logits_to_keep=width - first).float(), dim=-1)  # [B, width - first, V]
        targets = tokens[:, first + 1:]
        picked = logprobs.gather(2, targets[..., None]).squeeze(2)  # [B, width - first]
        greedy = logprobs.argmax(-1) == targets
        for row, r in enumerate(chunk):
            end = len(r.ids) - 1 - first
            span = slice(end - r.n_choice, end)
            out[order[start + row]] = (picked[row, span].sum().item(), bool(greedy[row, span].all()))
    return out


def summarize(items: list[Item], requests: list[Request], scores: list[tuple[float, bool]], log_samples: bool = False) -> dict:
    per_item = [[0.0] * len(item.choices) for item in items]
    for r, (s, _) in zip(requests, scores):
        per_item[r.item][r.choice] = s
    acc = acc_norm = 0
    logged = []
    for item, s in zip(items, per_item):
        pick = max(range(len(s)), key=lambda c: s[c])
        norm = [x / max(len(c), 1) for x, c in zip(s, item.choices)]
        acc += pick == item.answer
        acc_norm += max(range(len(s)), key=lambda c: norm[c]) == item.answer
        logged.append({"scores": s, "pick": pick})
    out = {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}
    if log_samples:
        out["items"] = logged
    return out


def score_task(model, requests: list[Request], batch_size: int, device: torch.device) -> list[tuple[float, bool]]:
    """loglikelihoods over every rank: each scores a share (padded to the same number of batches,
    since sharded engines need every rank in every forward) and the scores are gathered."""
    world, rank = cc.world_size(), cc.rank()
    mine = list(range(rank, len(requests), world))
    per_rank = -(-len(requests) // world)
    padded = [requests[k] for k in mine] + [requests[0]] * (per_rank - len(mine))
    scores = loglikelihoods(model, padded, batch_size, device)[:len(mine)]
    out = [(0.0, False)] * len(requests)
    for ids, values in cc.all_gather_objects((mine, scores)):
        for k, v in zip(ids, values):
            out[k] = v
    return out


class TaskEval(AddOn):
    """The run's tasks (eval.tasks), tokenized once with the tokenizer the data was prepared with,
    scored at every evaluation: `eval/<task>/acc` and `acc_norm`."""

    def __init__(self, cfg, tokenizer_file: Path, max_len: int, engine):
        from ..data_pipeline.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_file)
        self.batch_size, self.engine, self.tasks = cfg.task_batch_size, engine, []
        for t in cfg.tasks:
            items = load_items(t.path, t.max_items)
            self.tasks.append((t, items, build_requests(items, tokenizer, t.num_fewshot, t.seed, max_len)))

    def evaluate(self) -> dict:
        row = {}
        for t, items, requests in self.tasks:
            scores = score_task(self.engine.model, requests, self.batch_size, self.engine.spec.layout.device)
            result = summarize(items, requests, scores)
            row[f"eval/{t.stem}/acc"], row[f"eval/{t.stem}/acc_norm"] = result["acc"], result["acc_norm"]
        return row
