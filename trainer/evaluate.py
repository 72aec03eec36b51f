"""`cptrain eval`: what a model scores on a user's data before (or after) continuing it: the mean
next-token loss over a prepared split, normalized by target tokens, with document masking as in
training. MODEL is an HF folder, a cptrain run directory, checkpoint or weights folder.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import yaml

from ..data_pipeline.cache import DEFAULT_DIR, NodeCache
from ..data_pipeline.config import DomainConfig, prepared_tokenizer, read_manifest
from ..data_pipeline.loader import split_batches
from ..data_pipeline.remote import is_url, join
from ..errors import UserError
from ..model.decoder import Decoder
from .checkpoint import load_full_weights, resolve_checkpoint
from .engines.spec import autocast_for, uses_bf16
from .loss import token_losses
from .positions import Buckets, row_positions


def load_model(path: str | Path, device: torch.device) -> Decoder:
    """The full model of any folder `load_full_weights` reads, in fp32 on `device`, in eval mode."""
    cfg, state = load_full_weights(path)
    with torch.device("meta"):
        model = Decoder(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.to(device).eval()


def tokenizer_for(model_path: str | Path, explicit: str | None = None) -> Path:
    """The tokenizer of a model: `explicit` if given; an HF folder's own files; for a cptrain run,
    checkpoint or weights folder, the tokenizer its first data domain was prepared with."""
    if explicit:
        return Path(explicit)
    p = Path(model_path)
    if (p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file():
        return p
    candidates = [p / "config.yaml"] if (p / "config.yaml").is_file() else []
    if not candidates and p.is_dir():
        try:
            candidates = [resolve_checkpoint(p, verified=False) / "config.yaml"]
        except UserError:
            pass
    for cfg_file in candidates:
        if cfg_file.is_file():
            data = (yaml.safe_load(cfg_file.read_text()) or {}).get("data", {})
            path = (data.get("domains") or [{}])[0].get("path", "")
            if is_url(path) or (path and Path(path, "manifest.json").is_file()):
                return _data_tokenizer(path, data.get("cache_dir", DEFAULT_DIR))
    raise UserError(f"{model_path}: no tokenizer found (not an HF folder with tokenizer files, nor a run whose data "
                    "manifest names one); pass --tokenizer")


def _data_tokenizer(path: str, cache_dir: str) -> Path:
    """The tokenizer a prepared directory (or its URL: fetched into the node cache) was made with."""
    cache = NodeCache.open(cache_dir, 0) if is_url(path) else None
    return prepared_tokenizer(path, read_manifest(DomainConfig(name="", path=path), cache), cache)


def check_vocab(model: Decoder, vocab_size: int, where: str) -> None:
    if vocab_size > model.cfg.vocab_size:
        raise UserError(f"{where}: tokenizer vocabulary {vocab_size} exceeds the model's vocab_size {model.cfg.vocab_size}; "
                        "prepare the data with the model's own tokenizer (cptrain data prepare --tokenizer MODEL_DIR)")


@torch.no_grad()
def split_loss(model: Decoder, data: str | Path, split: str = "val", max_samples: int | None = None,
               batch_size: int = 8, precision: str = "auto", chunk_tokens: int = 0, position_buckets=()) -> dict:
    """{"loss", "tokens", "samples", "perplexity"}: the mean loss over the split's target tokens; with
    position_buckets (trainer/positions.py) also "positions": {"pos<lo>-<hi>": mean loss}."""
    device = next(model.parameters()).device
    manifest, batches = split_batches(str(data), split, batch_size, max_samples)
    check_vocab(model, manifest["tokenizer"]["vocab_size"], join(str(data), "manifest.json"))
    buckets = Buckets.of(position_buckets, manifest["seq_len"], "--position-buckets")
    acc = torch.zeros(2 * len(buckets.bounds) if buckets else 0, dtype=torch.float64, device=device)
    total, tokens, samples = 0.0, 0, 0
    with autocast_for(device, uses_bf16(precision, device.type)):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            losses = token_losses(model, batch, chunk_tokens)
            total += losses.double().sum().item()
            tokens += losses.numel()
            samples += losses.shape[0]
            if buckets:
                acc += buckets.sums(losses, row_positions(batch, losses))
    if not tokens:
        raise UserError(f"{join(str(data), split)}: no samples to evaluate")
    loss = total / tokens
    out = {"loss": loss, "tokens": tokens, "samples": samples, "perplexity": math.exp(min(loss, 700))}
    if buckets:
        out["positions"] = buckets.means(acc)
    return out


def write_json(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def lm_eval_tasks(model: Decoder, tokenizer, names: list[str], num_fewshot: int, batch_size: int,
                  limit: int | None = None, include: str | None = None) -> dict:
    """lm-evaluation-harness's own tasks (or task YAMLs under `include`), scored by its library over
    this model through an adapter: its loglikelihood requests become ours (trainer/tasks.py), so a
    task scores the same through either. {task: {metric: value}}."""
    try:
        import lm_eval
        from lm_eval.api.model import LM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--lm-eval needs lm-evaluation-harness; install it (pip install lm-eval) or use --task files") from None
    from .tasks import Request, _pair, loglikelihoods

    device = next(model.parameters()).device
    start = list(getattr(tokenizer, "prefix", []))

    class CptrainLM(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            ours = []
            for r in requests:
                ctx, cont = _pair(tokenizer, *r.args)
                ids = ((start + ctx) or [tokenizer.eos_id]) + cont
                ours.append(Request(0, 0, ids[-(model.cfg.max_seq_len + 1):], len(cont)))
            return loglikelihoods(model, ours, batch_size, device, progress=not disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise UserError("--lm-eval: perplexity (rolling log-likelihood) tasks are not supported; use cptrain eval --data")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise UserError("--lm-eval: generation tasks are not supported; use multiple-choice or log-likelihood tasks")

    manager = None
    if include:  # indexing lm-eval's thousands of built-in task YAMLs takes ~25 s: skip it when `include` has them all
        manager = TaskManager(include_path=include, include_defaults=False)
        if not set(names) <= set(manager.all_tasks):
            manager = None
    results = lm_eval.simple_evaluate(model=CptrainLM(), tasks=list(names), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager or TaskManager(include_path=include), log_samples=False,
                                      bootstrap_iters=0)
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
            for task, metrics in results["results"].items()}
