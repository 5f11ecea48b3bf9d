"""Checkpoint I/O on megatron-core dist_checkpointing (torch_dist format, reshardable).

Saves here are synchronous. megatron's async-capable writer collects per-rank write results
through a queue owned by a *spawn*-context multiprocessing Manager: 2-3 s to start on every first
save, and it re-imports `__main__`. A synchronous save needs no cross-process queue, so an
in-process queue replaces it (same interface: put/get)."""
from __future__ import annotations

import contextlib
import os
import queue
import shutil

import torch.distributed as dist

_LOCAL_RESULTS = queue.Queue()


def _use_local_results_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._get_write_results_queue = lambda: _LOCAL_RESULTS


@contextlib.contextmanager
def file_lock(path: str):
    """Exclusive inter-process lock on `path` (parallel jobs sharing a cache directory)."""
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_sharded(sharded_state_dict: dict, path: str, extra=None) -> None:
    """Write into `path.tmp` on every rank (then `extra(tmp_dir)` on every rank, for files of our
    own), then rank 0 renames it to `path` once all ranks are done: never half-written."""
    from megatron.core import dist_checkpointing

    _use_local_results_queue()
    tmp = path + ".tmp"
    if is_writer():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    dist_checkpointing.save(sharded_state_dict, tmp)
    if extra is not None:
        extra(tmp)
    barrier()
    if is_writer():
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier()


def load_sharded(sharded_state_dict: dict, path: str) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(sharded_state_dict, path)


# ---------------------------------------------------------------------------------------------
# Training checkpoints in Megatron's layout: SAVE/iter_0000100/ + latest_checkpointed_iteration.txt

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read; the message names the file."""


def iter_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def latest_step(root: str) -> int | None:
    """Step named by the tracker file, or None when there is no checkpoint under root."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        return None
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text[:40]!r}")
    step = int(text)
    if not os.path.isdir(iter_dir(root, step)):
        raise CheckpointError(f"{tracker}: names iteration {step} but {iter_dir(root, step)} is missing")
    return step


def write_tracker(root: str, step: int) -> None:
    """Updated last, atomically: a kill before this leaves the previous checkpoint current."""
    if is_writer():
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(root, TRACKER))
    barrier()


def save_torch(obj, path: str) -> None:
    import torch

    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_torch(path: str):
    """torch.load(weights_only=True): no arbitrary pickle code; errors name the file."""
    import torch

    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated, tampered, or not a torch file
        raise CheckpointError(f"{path}: cannot be read as a checkpoint file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None


def load_sharded_checked(sharded_state_dict: dict, path: str) -> dict:
    """load_sharded with failures turned into one line naming the checkpoint directory."""
    try:
        return load_sharded(sharded_state_dict, path)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load the sharded checkpoint ({type(e).__name__}: {first})") from None
