"""What the loop does when something goes wrong: signals, non-finite numbers, loss spikes.

- Signals (SIGTERM, SIGINT, SIGUSR1 - Slurm's pre-emption warning): the first one only sets a
  flag; every rank all-reduces it once a step, so all ranks stop after the same step, save a
  checkpoint and exit 0. A second signal exits at once: the checkpoint protocol
  (trainer/checkpoint.py) keeps a half-written checkpoint invisible.
- A non-finite loss (all-reduced, so NaN/inf on any rank is seen by all) skips the update on every
  rank; so does a non-finite global grad norm, which the engine's `step` refuses to apply. The data
  still advances: the batch that produced the NaN is not retried.
- Loss spikes: the step's loss against the mean and standard deviation of a window of recent
  losses (a z-score). Large-scale runs see such spikes and recover by rolling back to an earlier
  checkpoint and skipping the batches that preceded the spike (PaLM, Chowdhery et al. 2022, sec. 5.1;
  OPT, Zhang et al. 2022, logbook). `spike_action` logs, skips the update, or does that rollback.
- Repeated failure stops the run with one line (RunAborted) instead of looping forever.

Every decision is a pure function of all-reduced numbers and the config, so every rank takes it.
"""
from __future__ import annotations

import collections
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from ..errors import UserError
from .addons import AddOn

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Ctrl-C under torchrun reaches a worker twice within milliseconds (from the terminal, then forwarded
# by torchrun): a repeat this soon is the same request, not the "exit now" second signal.
_REPEAT_S = 1.0


@dataclass
class FaultsSection:
    max_consecutive_skips: int = 20  # stop the run after this many skipped (non-finite or spike) steps in a row; 0: never
    spike_zscore: float = 0.0  # >0: a loss this many standard deviations above the window's mean is a spike; 0: off
    spike_window: int = 50  # recent accepted losses the z-score uses; detection starts once the window is full
    spike_action: Literal["log", "skip", "rollback"] = "log"  # rollback: last good checkpoint, data continues past the spike
    max_rollbacks: int = 3  # a (max_rollbacks + 1)-th rollback within rollback_window_steps stops the run instead
    rollback_window_steps: int = 1000  # the window, in steps attempted by this process (replayed steps count)
    # Debugging only (fault-injection tests): never set these in a real run.
    inject_nan_at_steps: list[int] = field(default_factory=list)  # DEBUG: multiply the loss by NaN at these steps (first time reached)
    inject_spike_at_steps: list[int] = field(default_factory=list)  # DEBUG: multiply the loss by 100 at these steps (first time reached)
    inject_rank: int = -1  # DEBUG: inject only on this rank (-1: every rank)
    debug_checkpoint_delay_s: float = 0.0  # DEBUG: sleep after writing a checkpoint's files, before publishing it

    def __post_init__(self):
        if self.spike_zscore < 0 or self.spike_window < 2:
            raise UserError("faults.spike_zscore must be >= 0 and faults.spike_window >= 2")
        if min(self.max_consecutive_skips, self.max_rollbacks, self.rollback_window_steps) < 0:
            raise UserError("faults.max_consecutive_skips, max_rollbacks and rollback_window_steps must be >= 0")
        if self.debug_checkpoint_delay_s < 0:
            raise UserError("faults.debug_checkpoint_delay_s must be >= 0")


class RunAborted(UserError):
    """The run cannot make progress (repeated NaNs or spikes); the message says why, in one line."""


# Spike factor of `inject_spike_at_steps`: far outside any z-score threshold a user would set.
_SPIKE_FACTOR = 100.0


class FaultMonitor(AddOn):
    """Judges each step's all-reduced loss (the loop asks `judge` before the update and `judge_norm`
    after it: their verdict decides the step); as an add-on it injects debug faults into the loss and
    keeps its counters in checkpoints."""
    name = "faults"

    def __init__(self, cfg: FaultsSection, rank: int = 0):
        self.cfg, self.rank = cfg, rank
        self.load_state_dict({})
        self.consecutive = 0
        self.attempts = 0
        self._pending = math.nan  # the loss judge() accepted, entering the window once its update is applied
        self._injected: set[int] = set()  # DEBUG injections happen once per step number, not again after a rollback
        self.rollback_at: collections.deque = collections.deque()

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "spikes": self.spikes, "rollbacks": self.rollbacks,
                "window": list(self.window)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.spikes = int(state.get("spikes", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.window = collections.deque(state.get("window", []), maxlen=self.cfg.spike_window)

    def wrap_loss(self, loss_fn, step: int):
        """DEBUG: the loss function of `step`, with the configured NaN or spike injected."""
        if self.cfg.inject_rank not in (-1, self.rank) or step in self._injected:
            return loss_fn
        factor = (math.nan if step in self.cfg.inject_nan_at_steps else
                  _SPIKE_FACTOR if step in self.cfg.inject_spike_at_steps else None)
        if factor is None:
            return loss_fn
        self._injected.add(step)

        def injected(model, batch):
            loss, stats = loss_fn(model, batch)
            return loss * factor, {**stats, "loss_sum": stats["loss_sum"] * factor, "sample_loss": stats["sample_loss"] * factor}
        return injected

    def judge(self, loss: float, step: int) -> tuple[str, str]:
        """(verdict, message) for the step's loss before its update: 'update', 'skip' or 'rollback'."""
        self.attempts += 1
        if not math.isfinite(loss):
            return "skip", self._skip(f"step {step}: loss is {loss} on some rank; update skipped on every rank")
        z = self._zscore(loss)
        if z is not None and z > self.cfg.spike_zscore:
            self.spikes += 1
            what = f"step {step}: loss spike {loss:.4f} (z-score {z:.1f} over the last {len(self.window)} steps)"
            if self.cfg.spike_action == "rollback":
                return "rollback", self._rollback(what)
            if self.cfg.spike_action == "skip":
                return "skip", self._skip(what + "; update skipped")
            self._pending = loss
            return "update", what + "; logged only (faults.spike_action=log)"
        self._pending = loss
        return "update", ""

    def judge_norm(self, grad_norm: float, step: int) -> str:
        """The engine skips an update whose global grad norm is not finite; count it. '' if fine."""
        if math.isfinite(grad_norm):
            self.consecutive = 0
            self.window.append(self._pending)
            return ""
        return self._skip(f"step {step}: gradient norm is {grad_norm}; update skipped on every rank")

    def _zscore(self, loss: float) -> float | None:
        if self.cfg.spike_zscore <= 0 or len(self.window) < self.cfg.spike_window:
            return None
        n = len(self.window)
        mean = sum(self.window) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / (n - 1))
        return (loss - mean) / max(std, 1e-6 * max(abs(mean), 1.0))

    def _skip(self, what: str) -> str:
        self.skipped_steps += 1
        self.consecutive += 1
        limit = self.cfg.max_consecutive_skips
        if limit and self.consecutive > limit:
            raise RunAborted(f"{what}; {self.consecutive} skipped steps in a row (faults.max_consecutive_skips="
                             f"{limit}): the run diverged - lower schedule.lr or check the data, then resume")
        return what

    def _rollback(self, what: str) -> str:
        while self.rollback_at and self.rollback_at[0] <= self.attempts - self.cfg.rollback_window_steps:
            self.rollback_at.popleft()
        if len(self.rollback_at) >= self.cfg.max_rollbacks:
            raise RunAborted(f"{what}; {len(self.rollback_at)} rollbacks already within {self.cfg.rollback_window_steps} "
                             f"steps (faults.max_rollbacks={self.cfg.max_rollbacks}): stopping instead of looping - "
                             f"lower schedule.lr or inspect the data after the last checkpoint")
        self.rollback_at.append(self.attempts)
        self.rollbacks += 1
        return what + "; rolling back to the last good checkpoint and skipping the data since it"

    def row(self) -> dict:
        """Counters for metrics.jsonl (only once something happened, to keep clean runs' rows short)."""
        out = {}
        if self.skipped_steps:
            out["skipped_steps"] = self.skipped_steps
        if self.spikes:
            out["loss_spikes"] = self.spikes
        if self.rollbacks:
            out["rollbacks"] = self.rollbacks
        return out

    def before_publish(self) -> None:
        """DEBUG: widen the window in which a checkpoint is written but not yet visible."""
        if self.cfg.debug_checkpoint_delay_s:
            time.sleep(self.cfg.debug_checkpoint_delay_s)


class GracefulStop:
    """First stop signal: set a flag the loop acts on after the current step. Second: exit now."""

    def __init__(self):
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None and time.monotonic() - self._first_at < _REPEAT_S:
            return
        if self.signum is not None:
            # os._exit: no cleanup code runs that could publish half-written state.
            print(f"cptrain: second signal ({name}): exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum, self._first_at = signum, time.monotonic()
        print(f"cptrain: received {name}: finishing the current step, then saving a checkpoint "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop signal on another rank"

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank got a signal. Called once a step by every rank at the same
        point, so all ranks stop after the same step (one 1-element all-reduce)."""
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag)
        return flag.item() > 0
