"""In-process fork harness for multi-rank tests on gloo (docs/PLATFORM.md, Tests): forking after
megatron is imported in the parent starts ranks in ~0.1 s, versus ~10 s per torchrun launch."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
import socket
import traceback
from typing import Any, Callable

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tp: int, pp: int, megatron: bool,
            fn: Callable, args: tuple, queue) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        if megatron:
            from atesd_mc import distributed

            distributed.initialize(tp=tp, pp=pp, seed=1234, backend="gloo", timeout_minutes=2)
        else:
            import datetime

            import torch.distributed as dist

            dist.init_process_group("gloo", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(minutes=2))
        result = fn(*args)
        # Pickle here, so an unpicklable result is reported instead of dying in the feeder thread.
        queue.put((rank, "ok", pickle.dumps(result)))
        if megatron:
            from atesd_mc import distributed

            distributed.shutdown()
        else:
            import torch.distributed as dist

            dist.destroy_process_group()
    except BaseException:
        queue.put((rank, "err", traceback.format_exc()))


def run_distributed(fn: Callable, world: int = 2, *, tp: int = 1, pp: int = 1, megatron: bool = True,
                    args: tuple = (), timeout: float = 180) -> list[Any]:
    """Run fn(*args) on `world` forked gloo ranks; returns each rank's result (rank order).

    fn must be a module-level function; its return value must be picklable (use CPU tensors)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, tp, pp, megatron, fn, args, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except Exception:  # queue.Empty: check for ranks that died without reporting
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {sorted(set(range(world)) - set(results))} did not "
                                       f"finish within {timeout} s")
                continue
            if status == "err":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
