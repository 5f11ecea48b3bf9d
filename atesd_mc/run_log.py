"""Run output: Megatron's log line, metrics.jsonl, TensorBoard when installed, a progress bar, and
the progress line of an evaluation (Progress).

Only global rank 0 writes; every call is a no-op elsewhere (Progress: the caller enables it on
rank 0 only)."""
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


def _clock_text(seconds: float) -> str:
    """H:MM:SS, or M:SS under an hour."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Problems done / total, tokens/s and ETA of one evaluation, written to a stream (stderr).

    On a terminal the line is redrawn in place; otherwise (a log file) a plain line is written at
    the start, each time another tenth of the problems is done or `interval_s` has passed since the
    last line, and at the end. Disabled (ranks other than 0, --no-progress, logging.progress_bar
    off) it writes nothing. `update` takes the running totals, so it can be
    generation.generate_bucketed's progress callback as it is. `clock` is injectable for tests."""

    def __init__(self, total: int, label: str, *, rows_per_problem: int = 1, enabled: bool = True,
                 stream=None, clock=time.monotonic, interval_s: float = 30.0):
        self.total, self.label, self.per = total, label, max(1, rows_per_problem)
        self.enabled = enabled and total > 0
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock, self.interval_s = clock, interval_s
        self.start = self.last_line = clock()
        self.rows = self.tokens = 0
        self.next_tenth = 1
        if self.enabled:
            self._emit(self.start)

    @property
    def done(self) -> int:
        """Problems whose every row (k samples each) is generated."""
        return min(self.total, self.rows // self.per)

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = f"{self.tokens / elapsed:.1f} tokens/s" if elapsed > 0 else "- tokens/s"
        rows_left = self.total * self.per - self.rows
        eta = _clock_text(rows_left * elapsed / self.rows) if self.rows else "?"
        return (f"{self.label}: {self.done}/{self.total} problems ({100 * self.done // self.total}%)"
                f" | {rate} | elapsed {_clock_text(elapsed)} | ETA {eta}")

    def update(self, rows_done: int, tokens: int) -> None:
        """Running totals: rows (samples) generated and tokens generated so far."""
        if not self.enabled:
            return
        self.rows, self.tokens = rows_done, tokens
        now = self.clock()
        tenth = 10 * self.done // self.total
        if self.tty or tenth >= self.next_tenth or now - self.last_line >= self.interval_s:
            self.next_tenth = tenth + 1
            self._emit(now)

    def _emit(self, now: float) -> None:
        self.last_line = now
        text = f"\r{self.line(now)}\x1b[K" if self.tty else self.line(now) + "\n"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        """End the terminal line (the last state stays visible); nothing to do for a log."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self.tty = self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
