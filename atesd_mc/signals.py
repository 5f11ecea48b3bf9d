"""Graceful exits: SIGTERM/SIGINT (pre-emption), a wall-clock budget, or a step interval.

The handler only sets a flag; the loop checks it between steps, agrees with every rank (one
all-reduce, so no rank leaves a collective behind), saves a checkpoint and exits 0.

A torchrun worker whose launcher died (watch_launcher) sends itself that SIGTERM, and ends itself
for good after a grace period."""
from __future__ import annotations

import os
import signal
import sys
import threading
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


# ---------------------------------------------------------------------------------------------
# Orphaned workers: torchrun starts each worker in a session of its own, so a SIGKILL of torchrun
# (or of its process group) leaves the workers training; a relaunch on the same --save would then
# train beside them.

LAUNCHER_POLL_S = 1.0
LAUNCHER_GRACE_S = 20.0
"""After the launcher is seen gone: this long for the SIGTERM path (checkpoint at the next step
boundary), then a hard exit. Poll + grace stay well under 30 s."""


def watch_launcher(launcher_pid: int) -> threading.Thread | None:
    """Under torchrun (TORCHELASTIC_RUN_ID set), a daemon thread that ends this worker when its
    parent, the launcher `launcher_pid` (os.getppid() read first thing at start-up), is gone.

    Why polling getppid() and not prctl(PR_SET_PDEATHSIG): the death signal is tied to the parent
    *thread* that created the child and fires when that thread exits although the launcher lives
    on. torch 2.13's agent happens to start workers from its main thread, but that is no contract;
    the signal is also Linux-only and set through ctypes. An orphan is re-parented (to init or a
    sub-reaper), which getppid() shows within one poll, on any POSIX system, at no cost."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return None
    thread = threading.Thread(target=_watch, args=(launcher_pid,), name="launcher-watch", daemon=True)
    thread.start()
    return thread


def _watch(launcher_pid: int) -> None:
    while os.getppid() == launcher_pid:
        time.sleep(LAUNCHER_POLL_S)
    try:  # stderr may be a pipe nobody reads any more: never let that stop the exit
        print(f"rank {os.environ.get('RANK', '?')}: launcher (pid {launcher_pid}) is gone; stopping this "
              f"worker (a checkpoint if one can be saved within {LAUNCHER_GRACE_S:g} s)", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    # With the handler installed (in the loop) this asks for a checkpoint and a clean exit; before it
    # (start-up, warm start) or with --no-exit-signal-handler, SIGTERM's default action ends us now.
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(LAUNCHER_GRACE_S)
    os._exit(1)  # still here: the main thread is stuck (a collective with a dead rank, a slow save)
