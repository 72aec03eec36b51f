"""Where numbers go: metrics.jsonl (the run's record), tensorboard, experiment trackers (trainer/trackers.py),
the progress bar; throughput and MFU."""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

# Dense bf16 peak per device (datasheet). MFU is reported only where the peak is known.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def device_peak_tflops(device: torch.device, configured: float) -> float:
    if configured > 0:
        return configured
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


DROPPED = "metrics.dropped.jsonl"


def set_aside(path: Path, step: int) -> int:
    """Move the rows logged after `step` (a resume or rollback goes back there, and they will be
    logged again) from metrics.jsonl to metrics.dropped.jsonl beside it, appended: a run's record is
    never lost. Returns the number of rows moved."""
    if not path.is_file():
        return 0
    kept, moved = [], []
    for line in path.read_text().splitlines():
        try:
            (kept if json.loads(line).get("step", 0) <= step else moved).append(line)
        except json.JSONDecodeError:  # a row cut short by a crash mid-write
            moved.append(line)
    if moved:
        with open(path.with_name(DROPPED), "a") as f:
            f.write("".join(line + "\n" for line in moved))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return len(moved)


class Throughput:
    """Tokens/s over the steps since the last reading, excluding evaluation and checkpoint time."""

    def __init__(self):
        self.t0, self.tokens, self.paused = time.perf_counter(), 0, 0.0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def read(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0 - self.paused, 1e-9)
        self.t0, self.tokens, self.paused = now, 0, 0.0
        return rate


class MetricsLogger:
    def __init__(self, run_dir: Path, is_main: bool, tensorboard: bool, progress: bool, total_steps: int, start_step: int,
                 trackers: Sequence = ()):
        self.is_main = is_main
        self.trackers = trackers  # open, on rank 0 (trackers.open_trackers); closed with this logger
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a") if is_main else None
        self.tb = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        self.bar = None
        if is_main and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def set_aside(self, step: int) -> int:
        """set_aside() on this run's metrics.jsonl, keeping this logger appending to the new file."""
        if not self.is_main:
            return 0
        self.file.close()
        moved = set_aside(self.path, step)
        self.file = open(self.path, "a")
        return moved

    def log(self, row: dict) -> None:
        if not self.is_main:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "tokens") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])
        for tracker in self.trackers:
            tracker.log(row)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        for tracker in self.trackers:  # after the run's last files are written: they go as artifacts
            tracker.close()
