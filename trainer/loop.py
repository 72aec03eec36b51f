"""`cptrain train`: the build order and the one training loop, whatever the engine.

config -> data checks -> model on the meta device -> engine (parallelize, then initialize) ->
optimizer -> schedule -> data -> loop. The loop's side effects (logging, evaluation,
checkpointing) are small functions called after each step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..data_pipeline.config import validate_data
from ..data_pipeline.loader import build_train_loader, build_val_loaders
from ..data_pipeline.seqlen import cut_rows, seq_len_at
from ..model.config import flops_per_token, hardware_flops_per_token, param_counts
from . import checkpoint as ckpt
from . import continual
from .addons import AddOn, Step
from .averaging import WeightEMA
from .config import TrainConfig, save_config
from .engines import build_engine
from .engines.context import ContextParallel
from .engines.layout import init_distributed
from .engines.spec import autocast_for, engine_spec
from .faults import FaultMonitor, GracefulStop
from .freezing import Freezer
from .loss import lm_loss, token_losses
from .mer import MetaReplayAddOn
from .metrics import DROPPED, MetricsLogger, Throughput, device_peak_tflops, set_aside
from .moe import ExpertBalance
from .passkey import PasskeyEval
from .positions import Buckets, row_positions
from .reweighting import Reweighter
from .schedule import build_schedule
from .sparsity import Pruner
from .start import StartPlan, plan_start
from .tasks import TaskEval
from .trackers import open_trackers


@dataclass
class Progress:
    """Counters saved in every checkpoint; with the data and schedule state (and the add-ons' own,
    trainer/addons.py) they continue a run exactly."""
    step: int = 0
    tokens: int = 0
    last_lr: float = 0.0
    data: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> "Progress":
        """The progress of a checkpoint; the add-on entries that older checkpoints kept beside it
        (faults, reweighting) are the add-ons' to read (addons.saved_state)."""
        saved = ckpt.read_state(folder)["progress"]
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


def build_addons(cfg: TrainConfig, engine, loader, val_loaders: dict, tokenizer_file: Path, step: int, say) -> list[AddOn]:
    """The run's add-ons, in the order their hooks run: faults inject and judge, reweighting weighs the
    batch, freezing holds rows, sparsity masks, meta-experience replay interpolates, the EMA averages
    what those left, tasks and passkey prompts score. `step`: the step the run starts from."""
    addons: list[AddOn] = [FaultMonitor(cfg.faults, engine.spec.layout.rank), Reweighter(cfg, engine, loader, val_loaders)]
    if cfg.freeze.phases:
        addons.append(Freezer(cfg.freeze, cfg.model.init_from, engine, say))
    addons.append(Pruner(cfg.sparsity, cfg.train.max_tokens, param_counts(cfg.model.arch)[0], engine, say))
    if cfg.continual.mer.interval:
        addons.append(MetaReplayAddOn(cfg.continual.mer, engine, step))
    if cfg.train.ema_decay:
        addons.append(WeightEMA(cfg.train.ema_decay, engine, say))
    if cfg.eval.tasks:
        addons.append(TaskEval(cfg.eval, tokenizer_file, cfg.model.arch.max_seq_len, engine))
    if cfg.eval.passkey.lengths:
        addons.append(PasskeyEval(cfg.eval.passkey, tokenizer_file, engine))
    if cfg.model.arch.n_experts:
        addons.append(ExpertBalance(cfg.moe, cfg.model.arch, engine, cfg.run_dir, engine.spec.layout.is_main))
    return addons


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def evaluate(engine, val_loaders: dict, chunk_tokens: int, addons: list[AddOn] = (), shard=None,
             buckets: Buckets | None = None) -> dict:
    """Mean token loss per validation domain (and per position bucket), and the add-ons' evaluations
    (tasks, passkey), over all ranks; `shard`: a batch as this rank holds it (context parallelism)."""
    out, device = {}, engine.spec.layout.device
    shard = shard or (lambda batch: batch)
    engine.model.eval()
    with torch.no_grad(), autocast_for(device, engine.spec.bf16):
        for name, batches in val_loaders.items():
            acc = torch.zeros(2 + (2 * len(buckets.bounds) if buckets else 0), dtype=torch.float64, device=device)
            for batch in batches():
                held = shard(_to_device(batch, device))
                losses = token_losses(engine.model, held, chunk_tokens)  # [B, S] (S: this rank's positions)
                acc[:2] += torch.stack([losses.double().sum(), torch.tensor(losses.numel(), dtype=torch.float64, device=device)])
                if buckets:
                    acc[2:] += buckets.sums(losses, row_positions(held, losses))
            _all_reduce(acc)
            out[f"val/{name}"] = (acc[0] / acc[1].clamp(min=1)).item()
            if buckets:
                out.update({f"val/{name}/{k}": v for k, v in buckets.means(acc[2:]).items()})
        for addon in addons:
            out.update(addon.evaluate())
    engine.model.train()
    return out


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _crossed(before: int, after: int, interval: int) -> bool:
    return interval > 0 and before // interval != after // interval


class Trainer:
    """Holds what one run needs; `train()` is the loop."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False, stop: GracefulStop | None = None):
        self.cfg = cfg
        self.stop = stop or GracefulStop()  # installed by run(); a bare one is never signalled
        self.layout = init_distributed(cfg.train.device, cfg.parallel)
        self.run_dir = Path(cfg.run_dir)
        arch = cfg.model.arch
        self.data = validate_data(cfg.data, arch.vocab_size)  # before any expensive work
        self.spec = engine_spec(cfg, self.layout)
        self._say(self.layout.describe())
        self.plan = plan_start(cfg, resume, overwrite, say=self._say)
        for line in self.plan.skipped:
            self._say(line)
        self._say(self.plan.describe())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.layout.is_main:
            save_config(cfg, self.run_dir / "config.yaml")

        initial = ckpt.load_full_weights(self.plan.source)[1] if self.plan.initial_weights else None
        self.engine = build_engine(self.spec, arch, initial, seed=cfg.seed)
        self.progress = self._restore(self.plan)
        self.end_tokens = self._end_tokens()
        self.schedule = build_schedule(cfg.schedule, self.end_tokens, cfg.train.global_batch_tokens)
        if self.progress.schedule:
            self.schedule.load_state_dict(self.progress.schedule)
        if self.progress.tokens or self.progress.last_lr:
            # Keeps the LR continuous when the schedule changed at resume, and gives a rewarm its
            # starting LR (the checkpoint's) when continuing from another run.
            self.schedule.on_resume(self.progress.tokens, None if self.progress.schedule else (self.progress.last_lr or None))
        self.loader = build_train_loader(self.data, micro_batch_size=cfg.train.micro_batch_size, rank=self.layout.dp_rank,
                                         world_size=self.layout.dp_size, seed=cfg.seed, state=self.progress.data or None)
        self.val_loaders = build_val_loaders(self.data, micro_batch_size=cfg.train.micro_batch_size, rank=self.layout.dp_rank,
                                             world_size=self.layout.dp_size, max_samples=cfg.eval.max_samples)
        self.domains = [d.name for d in cfg.data.domains + cfg.data.replay]  # the loader's `domain` indices
        self.cp = ContextParallel(self.layout, arch.doc_masking) if self.layout.cp > 1 else None
        self.buckets = Buckets.of(cfg.eval.position_buckets, cfg.data.seq_len, "eval.position_buckets")
        self.scores = bool(cfg.eval.tasks or cfg.eval.passkey.lengths)  # add-ons that evaluate without validation data
        tokenizer = self.data.tokenizer_path() if self.scores else None  # the one the data was prepared with
        self.addons = build_addons(cfg, self.engine, self.loader, self.val_loaders, tokenizer, self.progress.step, self._say)
        self.faults = self.addons[0]  # the add-on whose verdicts decide each step
        if self.plan.masks:  # a cptrain checkpoint: what the add-ons kept in it (masks of a sparse one, ...)
            for addon in self.addons:
                addon.load(Path(self.plan.source), "resume" if self.plan.counters else "init")
        self.saved_step = -1  # the step of the last checkpoint this process started
        self.saver = ckpt.Checkpointer(self.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_, self.layout.device,
                                       self.faults.before_publish)
        self._write_run_info()

    def _say(self, text: str) -> None:
        if self.layout.is_main:
            print(text, flush=True)

    def _end_tokens(self) -> int:
        """Where this run stops: train.max_tokens, rounded down to whole steps of the global batch from
        where it starts (a resume may change the batch size), with a line saying so."""
        start, batch, budget = self.progress.tokens, self.cfg.train.global_batch_tokens, self.cfg.train.max_tokens
        end = start + max(budget - start, 0) // batch * batch
        if end != budget:
            self._say(f"train.max_tokens={budget:,} is not a whole number of steps of train.global_batch_tokens={batch:,} "
                      f"from {start:,} tokens: this run ends at {end:,} tokens")
        return end

    def _restore(self, plan: StartPlan) -> Progress:
        """Engine state, counters and RNG as the plan says; the Progress the run continues from."""
        source = Path(plan.source)
        if plan.engine_state:
            self.engine.load(source, optimizer=plan.optimizer)
        if plan.counters:
            ckpt.restore_rng(source, self.layout.rank)
            return Progress.read(source)
        progress = Progress(last_lr=plan.last_lr or 0.0)  # where a `rewarm_from: checkpoint` schedule starts
        if plan.data_position:
            progress.data = Progress.read(source).data
        return progress

    def _write_run_info(self) -> None:
        arch = self.cfg.model.arch
        total, non_emb = param_counts(arch)
        active = param_counts(arch, active=True)[0]
        if arch.n_experts:
            self._say(f"model: {total / 1e6:,.1f}M parameters, {active / 1e6:,.1f}M active per token ({arch.n_experts} "
                      f"experts, top {arch.moe_top_k}, in {sum(arch.moe_layers)} of {arch.n_layers} layers); "
                      "MFU counts the active ones")
        flops, hardware_flops = self._flops(self.cfg.data.seq_len)
        self.peak = device_peak_tflops(self.layout.device, self.cfg.train.peak_tflops) * 1e12
        if self.layout.is_main:
            info = {"params": total, "params_non_embedding": non_emb, "params_active": active,
                    "flops_per_token": flops, "hardware_flops_per_token": hardware_flops,
                    "world_size": self.layout.world_size, "grad_accumulation": self.spec.accumulation,
                    "engine": self.cfg.train.engine, "device": str(self.layout.device),
                    "data_manifest": self.data.manifest.get("tokenizer")}
            (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=1))

    def _flops(self, seq_len: int) -> tuple[float, float]:
        """Model and hardware FLOPs per token on rows of seq_len tokens (attention grows with it)."""
        arch, recompute = self.cfg.model.arch, self.cfg.train.activation_checkpointing
        return flops_per_token(arch, seq_len), hardware_flops_per_token(arch, seq_len, recompute)

    def _loss_fn(self):
        scale = self.layout.world_size / self.cfg.train.global_batch_tokens  # gradients are averaged over every rank
        chunk, coefs = self.cfg.train.loss_chunk_tokens, self.cfg.moe.coefs(self.cfg.model.arch)
        return lambda model, batch: lm_loss(model, batch, scale, chunk, coefs)

    def train_step(self, data_iter) -> tuple[dict, Step]:
        """One optimizer step over `accum` micro-batches; returns the step's metrics and what the hooks
        after it are told."""
        n_dom, accum, p = len(self.domains), self.spec.accumulation, self.progress
        acc = torch.zeros(1 + 2 * n_dom, dtype=torch.float64, device=self.layout.device)
        loss_fn = self._loss_fn()
        for addon in self.addons:
            loss_fn = addon.wrap_loss(loss_fn, p.step + 1)
        seq_len = seq_len_at(self.cfg.data, p.tokens)  # rows cut to this length before the context split
        batches = [self._shard(cut_rows(_to_device(next(data_iter), self.layout.device), seq_len)) for _ in range(accum)]
        row, sums = {}, {}  # sums: what the loss reports besides (router statistics), added over micro-batches and ranks
        for addon in self.addons:
            row.update(addon.before_step(batches, p.tokens))
        for i, batch in enumerate(batches):
            stats = self.engine.forward_backward(batch, loss_fn, sync=i == accum - 1)
            sums = {k: v.double() + sums.get(k, 0) for k, v in stats.get("sums", {}).items()}
            acc[0] += stats["loss_sum"].double()
            dom = batch["domain"]
            acc[1:1 + n_dom] += torch.bincount(dom, weights=stats["sample_loss"].double(), minlength=n_dom)[:n_dom]
            acc[1 + n_dom:] += torch.bincount(dom, minlength=n_dom)[:n_dom].double() / self.layout.cp  # a row, once
        # The LR of a step is the schedule's value at the tokens seen once the step is done: the first
        # step already learns, and the last one lands exactly on the schedule's final LR.
        lr = self.schedule.lr(p.tokens + self.cfg.train.global_batch_tokens)
        _all_reduce(acc)  # before the update: every rank judges the same loss (trainer/faults.py)
        for v in sums.values():
            _all_reduce(v)
        loss = (acc[0] / self.cfg.train.global_batch_tokens).item()
        verdict, note = self.faults.judge(loss, p.step + 1)
        grad_norm = math.nan
        if verdict == "update":
            grad_norm = self.engine.step(lr)
            skipped = self.faults.judge_norm(grad_norm, p.step + 1)
            verdict, note = ("skip", skipped) if skipped else (verdict, note)
        else:
            self.engine.zero_grad()
        row = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "seq_len": seq_len, **row, **self.faults.row()}
        if note:
            row.update(fault=note, fault_action=verdict)
        for d, name in enumerate(self.domains):
            if n_dom > 1 and acc[1 + n_dom + d] > 0:
                row[f"train/{name}"] = (acc[1 + d] / acc[1 + n_dom + d]).item()
        step = Step(p.step + 1, p.tokens, p.tokens + self.cfg.train.global_batch_tokens, verdict == "update",
                    acc[1:1 + n_dom], acc[1 + n_dom:], sums)
        return row, step

    def save(self, log: MetricsLogger, wait: bool = False) -> Path | None:
        """Checkpoint the state after this step; returns its folder once published (with `wait`, or
        always without checkpoint.async), else None: poll() publishes it later."""
        self.progress.data = self.loader.state_dict()
        self.progress.schedule = self.schedule.state_dict()
        state = {"progress": dataclasses.asdict(self.progress), "engine": self.cfg.train.engine,
                 "world_size": self.layout.world_size, "time": time.time()}
        texts = {"model_config.json": json.dumps(dataclasses.asdict(self.cfg.model.arch))}
        if self.layout.is_main:
            texts["config.yaml"] = (self.run_dir / "config.yaml").read_text()
        self.saved_step = self.progress.step
        folder = self.saver.save(self.progress.step, self.engine, self.addons, state, texts)
        if wait and folder is None:
            folder = self.saver.wait()
        if folder is not None:
            log.message(f"saved checkpoint {folder}")
        return folder

    def _rollback(self, log: MetricsLogger, note: str) -> bool:
        """Back to the newest good checkpoint's weights, optimizer and counters. The loader is not
        rewound: the batches since the checkpoint, which led to the spike, are skipped."""
        self._published(self.saver.wait(), log)
        folder = ckpt.find_resume(self.run_dir, log=log.message)
        if folder is None:
            log.message(f"{note}: no checkpoint to roll back to; the update was skipped instead")
            return False
        self.engine.load(folder, optimizer=True)
        for addon in self.addons:
            addon.load(folder, "rollback")
        saved, p = Progress.read(folder), self.progress
        p.step, p.tokens, p.last_lr, p.schedule = saved.step, saved.tokens, saved.last_lr, saved.schedule
        if p.schedule:
            self.schedule.load_state_dict(p.schedule)
        log.set_aside(p.step)  # the abandoned branch's rows
        log.log({"step": p.step, "tokens": p.tokens, "fault": note, "fault_action": "rollback", **self.faults.row()})
        log.message(f"{note}: rolled back to {folder}")
        return True

    def _published(self, folder: Path | None, log: MetricsLogger) -> None:
        if folder is not None:
            log.message(f"saved checkpoint {folder}")

    def _after_step(self, step: Step, row: dict, log: MetricsLogger, speed: Throughput) -> dict:
        """The hooks of a finished step, in order: the add-ons' after_update (weights), metrics,
        evaluation, the add-ons' after_step, logging, checkpointing. Returns the step's row."""
        cfg, p = self.cfg, self.progress
        last = p.tokens >= self.end_tokens
        for addon in self.addons:
            row.update(addon.after_update(step))
        speed.add(step.after - step.before)
        row = {"step": p.step, "tokens": p.tokens, **row}
        if p.step % cfg.log.interval_steps == 0 or last:
            row["tokens_per_s"] = speed.read()
            if self.peak:  # model FLOPs utilization, and the hardware's (recomputation counted), at the step's length
                flops, hardware_flops = self._flops(row["seq_len"])
                row["mfu"] = flops * row["tokens_per_s"] / (self.peak * self.layout.world_size)
                row["hfu"] = hardware_flops * row["tokens_per_s"] / (self.peak * self.layout.world_size)
            log.progress(p.step, row["loss"], row["tokens_per_s"])
        t0 = time.perf_counter()
        if _crossed(step.before, p.tokens, cfg.eval.interval_tokens) or (last and (self.val_loaders or self.scores)):
            row.update(self._evaluate())
        for addon in self.addons:
            row.update(addon.after_step(step, row))  # e.g. mixture weights from the next step on
        if "tokens_per_s" in row or any(k.startswith(("val/", "eval/", "domain_weight/")) for k in row) or "fault" in row:
            log.log(row)
        if "fault" in row:
            log.message(row["fault"])
        self._published(self.saver.poll(), log)
        if _crossed(step.before, p.tokens, cfg.checkpoint.interval_tokens) or (last and cfg.checkpoint.at_end):
            self.save(log)
        speed.pause(time.perf_counter() - t0)
        return row

    def _shard(self, batch: dict) -> dict:
        """The batch as this rank holds it: whole rows, or its part of each under context parallelism."""
        return self.cp.shard(batch) if self.cp is not None else batch

    def _evaluate(self) -> dict:
        return evaluate(self.engine, self.val_loaders, self.cfg.train.loss_chunk_tokens, self.addons, self._shard,
                        self.buckets)

    def train(self) -> list[dict]:
        cfg, p = self.cfg, self.progress
        if self.layout.is_main and (moved := set_aside(self.run_dir / "metrics.jsonl", p.step)):
            self._say(f"moved {moved} metrics rows logged after step {p.step} to {self.run_dir / DROPPED}")
        steps = p.step + (self.end_tokens - p.tokens) // cfg.train.global_batch_tokens
        log = MetricsLogger(self.run_dir, self.layout.is_main, cfg.log.tensorboard, cfg.log.progress, steps, p.step,
                            open_trackers(cfg.log, self.run_dir) if self.layout.is_main else ())
        rows = []
        if p.step == 0 and cfg.eval.at_start and (self.val_loaders or self.scores):
            row = {"step": 0, "tokens": 0, **self._evaluate()}
            start = Step(0, 0, 0, False, torch.zeros(0), torch.zeros(0))
            for addon in self.addons:
                row.update(addon.after_step(start, row))  # signal=val: the first evaluation is the reference
            log.log(row)
            rows.append(row)
        speed, data_iter = Throughput(), iter(self.loader)
        while p.tokens < self.end_tokens:
            row, step = self.train_step(data_iter)
            if row.get("fault_action") == "rollback" and self._rollback(log, row["fault"]):
                continue
            p.step, p.tokens, p.last_lr = step.number, step.after, row["lr"]
            rows.append(self._after_step(step, row, log, speed))
            if self.stop.agreed(self.layout.device) and p.tokens < self.end_tokens:
                self._published(self.saver.wait(), log)
                if self.saved_step != p.step:
                    self.save(log, wait=True)
                log.message(f"stopped by {self.stop.name} after step {p.step}; saved checkpoint "
                            f"{self.run_dir / 'checkpoints' / f'step-{p.step:08d}'}; continue with `cptrain train CONFIG --resume`")
                break
        self._published(self.saver.wait(), log)
        for addon in self.addons:
            addon.at_end(self.run_dir)
        if self.layout.is_main and p.tokens >= self.end_tokens:
            continual.at_end_of_run(cfg, self.run_dir, log.message)  # the forgetting report
        log.close()  # after the report: the trackers take the run's reports and plots as artifacts
        return rows


def run(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> list[dict]:
    """Train one config in this process (the `cptrain train` command, tests, the demo). resume:
    continue from the run directory's checkpoint; overwrite: move a run already there aside."""
    with GracefulStop() as stop:
        return Trainer(cfg, resume=resume, overwrite=overwrite, stop=stop).train()

