"""Run output: Megatron's log line, metrics.jsonl, TensorBoard when installed, a progress bar.

Only global rank 0 writes; every call is a no-op elsewhere."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time


class Timer:
    """Wall time per stage of one step. On CUDA the device is synchronised before each clock read:
    kernels run asynchronously, and without it a stage's time would land on the next stage that
    waits for the device (and with it the per-stage tokens/s and MFU)."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def reset(self) -> dict[str, float]:
        out, self.times = self.times, {}
        return out


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _fmt(value) -> str:
    """Megatron prints losses and rates in %E; short fields plainly."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.6E}" if abs(value) >= 1e4 or (0 < abs(value) < 1e-2) else f"{value:.4f}"
    return str(value)


def megatron_line(step: int, total: int, fields: dict) -> str:
    """`[time] iteration N/ T | key: value | ...` as Megatron prints it."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    parts = [f" [{stamp}] iteration {step:8d}/{total:8d}"]
    parts += [f"{k}: {_fmt(v)}" for k, v in fields.items() if v is not None]
    return " | ".join(parts) + " |"


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, total_steps: int, *, tensorboard: bool = True,
                 progress_bar: bool = True, resume: bool = False):
        self.enabled, self.total = enabled, total_steps
        self.run_dir = run_dir
        self.tb = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a" if resume else "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except Exception:  # tensorboard not installed: silently skip, it is optional
                self.tb = None
        if progress_bar and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, dynamic_ncols=True, leave=False)

    def step(self, record: dict, line_fields: dict | None = None) -> None:
        """Append one step's record; print the Megatron line when line_fields is given."""
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])
        if self.bar is not None:
            self.bar.update(1)
        if line_fields is not None:
            self.print(megatron_line(record["step"], self.total, line_fields))

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
