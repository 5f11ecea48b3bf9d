"""Checkpoint I/O on megatron-core dist_checkpointing (torch_dist format, reshardable).

Saves here are synchronous. megatron's async-capable writer collects per-rank write results
through a queue owned by a *spawn*-context multiprocessing Manager: 2-3 s to start on every first
save, and it re-imports `__main__`. A synchronous save needs no cross-process queue, so an
in-process queue replaces it (same interface: put/get)."""
from __future__ import annotations

import os
import queue
import shutil

import torch.distributed as dist

_LOCAL_RESULTS = queue.Queue()


def _use_local_results_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._get_write_results_queue = lambda: _LOCAL_RESULTS


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_sharded(sharded_state_dict: dict, path: str) -> None:
    """Write into `path.tmp` on every rank, then rank 0 renames it to `path` (never half-written)."""
    from megatron.core import dist_checkpointing

    _use_local_results_queue()
    tmp = path + ".tmp"
    if is_writer():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    dist_checkpointing.save(sharded_state_dict, tmp)
    barrier()
    if is_writer():
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier()


def load_sharded(sharded_state_dict: dict, path: str) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(sharded_state_dict, path)
