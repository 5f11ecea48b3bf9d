"""One run per run directory (issue 17): rank 0 holds an exclusive lock on <save>/run.lock from
before anything is written there until its process ends; a second launch on the directory stops
with one line naming the holder, and a run that already finished says so instead of running again.

The lock is fcntl.flock on an open file descriptor: the kernel drops it when the holding process
ends, however it ends (SIGKILL and OOM kills included), so a lock left behind by a dead run never
blocks the next one. A pid file alone could not tell a live holder from a recycled pid. The file's
text (host, pid, start time) only says who holds it, for the message. A launch that finds the lock
held reads that text and nothing else: it creates, truncates and writes nothing in the directory.
(flock works across hosts on NFSv4 and Lustre mounted with locking; where the file system refuses
locks, the run goes on with a warning rather than not at all.)"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

LOCK_NAME = "run.lock"
EVAL_NAME = "eval.json"

_HELD: dict[str, int] = {}
"""realpath of a run directory -> the open descriptor holding its lock (kept until the process ends)."""


class RunDirError(RuntimeError):
    """This launch must not use the run directory (in use, or past its --train-iters): exit 2."""


class RunFinished(Exception):
    """The run in this directory is over; nothing to do (exit 0). Not an error."""


def acquire(run_dir: str) -> str | None:
    """Lock `run_dir` (created if missing) for this process. None when this process holds the lock
    now (re-entrant: a second build in the same process keeps it); otherwise the one-line reason."""
    key = os.path.realpath(run_dir)
    if key in _HELD:
        return None
    fd, busy = _lock(run_dir)
    if fd is not None:
        _keep(key, fd)
    return busy


def _lock(run_dir: str) -> tuple[int | None, str | None]:
    """(descriptor now holding the lock, None), or (None, why not); (None, None) where the file
    system has no locks. Writes nothing: O_CREAT does not truncate an existing file."""
    os.makedirs(run_dir, exist_ok=True)
    fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        return None, (f"{run_dir} is in use by the run on host {holder.get('host', '?')}, pid "
                      f"{holder.get('pid', '?')} (started {holder.get('started', '?')})")
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        print(f"warning: {run_dir}: this file system does not support locks ({e.strerror}); a second "
              f"launch on this directory will not be stopped", file=sys.stderr, flush=True)
        return None, None
    return fd, None


def _keep(key: str, fd: int) -> None:
    """Hold the lock until the process ends, and say who holds it."""
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _HELD[key] = fd


def _holder(fd: int) -> dict:
    """Who holds the lock, from the file's text. The holder writes it right after locking, so an
    empty file means "just now": read again for up to a second before giving up on the details."""
    for _ in range(50):
        text = os.pread(fd, 4096, 0)
        try:
            return json.loads(text)
        except ValueError:
            time.sleep(0.02)
    return {}


def release(run_dir: str) -> None:
    """Drop this process's lock on `run_dir` (in-process callers; a run keeps it until it exits)."""
    fd = _HELD.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)


def verdict(run_dir: str, train_iters: int) -> tuple[str, str] | None:
    """Rank 0: lock the directory, then look at its run. None: go on (fresh or resumable), the lock
    kept; ("error", line): refuse (exit 2); ("finished", line): nothing to do (exit 0). A launch that
    ends here writes nothing in the directory (not even run.lock's text)."""
    key = os.path.realpath(run_dir)
    fd = None
    if key not in _HELD:
        fd, busy = _lock(run_dir)
        if busy:
            return "error", busy
    try:
        outcome = _look(run_dir, train_iters)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    if fd is not None:
        if outcome is None:
            _keep(key, fd)
        else:
            os.close(fd)
    return outcome


def _look(run_dir: str, train_iters: int) -> tuple[str, str] | None:
    from atesd_mc.checkpoint import latest_step

    step = latest_step(run_dir)
    if step is None:
        return None
    if step > train_iters:
        return "error", (f"{run_dir} holds a checkpoint at iteration {step}, past --train-iters {train_iters}; "
                         f"pass --train-iters {step} or more to continue it, or use another --save")
    if step == train_iters and os.path.exists(os.path.join(run_dir, EVAL_NAME)):
        return "finished", (f"{run_dir} already finished {step} iterations ({EVAL_NAME}); to train further pass "
                            f"a larger --train-iters, to start over use another --save or delete the directory")
    return None  # step == train_iters without eval.json: killed in the final evaluation, redo it


def claim(run_dir: str, train_iters: int) -> None:
    """Every rank, after the process group exists and before anything touches `run_dir`: rank 0
    decides (verdict), one broadcast tells the others, and every rank raises the same exception
    (RunDirError, RunFinished) or returns. Rank 0 turns its own failures into a verdict too, so that
    no rank is left waiting in the broadcast."""
    import torch.distributed as dist

    from atesd_mc import distributed

    from atesd_mc.checkpoint import CheckpointError

    outcome = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            outcome = verdict(run_dir, train_iters)
        except CheckpointError as e:  # a damaged tracker: say so as the loader would
            outcome = ("checkpoint", str(e))
        except Exception as e:  # no permission, ...
            outcome = ("error", str(e) if isinstance(e, RuntimeError) else f"{run_dir}: {e}")
    outcome = distributed.broadcast_object(outcome)
    if outcome is None:
        return
    kind, line = outcome
    raise {"finished": RunFinished, "checkpoint": CheckpointError}.get(kind, RunDirError)(line)
