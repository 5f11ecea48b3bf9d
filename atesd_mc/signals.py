"""Graceful exits: SIGTERM/SIGINT (pre-emption), a wall-clock budget, or a step interval.

The handler only sets a flag; the loop checks it between steps, agrees with every rank (one
all-reduce, so no rank leaves a collective behind), saves a checkpoint and exits 0."""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

_REQUESTED: list[str] = []


def _handler(signum, frame):
    _REQUESTED.append(signal.Signals(signum).name)


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _handler)


def exit_reason(step: int, started: float, duration_mins: float, interval: int) -> str | None:
    """Why this run should stop now (agreed over all ranks), or None."""
    reasons = []
    if _REQUESTED:
        reasons.append(f"received {_REQUESTED[0]}")
    if duration_mins and time.monotonic() - started >= 60 * duration_mins:
        reasons.append(f"exit duration of {duration_mins} min reached")
    if interval and step % interval == 0:
        reasons.append(f"exit interval {interval} reached")
    flag = torch.tensor([1.0 if reasons else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return None
    return reasons[0] if reasons else "another rank asked to exit"
