"""torch.distributed + megatron parallel_state setup: the only module that knows CPU from GPU.

On CUDA nothing here patches anything: NCCL, megatron's CUDA RNG tracker and the transformer-engine
spec are used as they are. On a CPU-only torch build megatron-core needs a few workarounds, all
collected in :func:`apply_cpu_compat` (docs/PLATFORM.md, CPU workarounds, says why):

* ``torch.cuda.current_device`` -> cpu (rope tables and TP comm buffers ask for it);
* ``torch.cuda.synchronize`` / ``current_stream`` -> no-ops (p2p, dist_checkpointing, DDP 0.19);
* a process-global TorchFunctionMode that maps ``device="cuda"`` literals (schedules, optimizer,
  clip_grads) to CPU and makes ``Tensor.type()`` report ``torch.cuda.*`` (megatron asserts on it);
* a CPU RNG tracker in place of megatron's CUDA one;
* an RMSNorm that tolerates sequence parallelism (megatron's WrappedTorchNorm refuses it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_CPU_COMPAT_APPLIED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this rank computes on."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_for(requested: str = "auto") -> str:
    """auto -> nccl with CUDA, gloo otherwise."""
    if requested != "auto":
        return requested
    return "nccl" if cuda_available() else "gloo"


# ---------------------------------------------------------------------------------------------
# CPU workarounds for megatron-core


class CpuRNGStatesTracker:
    """Megatron's CudaRNGStatesTracker interface over the CPU default generator."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _is_cuda(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return isinstance(dev, str) and dev.startswith("cuda")


class _CudaToCpuMode(TorchFunctionMode):
    """Maps device='cuda' literals to CPU; Tensor.type() reports torch.cuda.* types."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class _NullStream:
    def wait_event(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def record_event(self, *a, **k):
        return None


class SequenceParallelRMSNorm:
    """torch RMSNorm/LayerNorm whose params are tagged ``sequence_parallel`` so DDP all-reduces
    their grads over TP (what TE/apex norms do); megatron's WrappedTorchNorm rejects SP."""

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        module = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in module.parameters():
            p.sequence_parallel = config.sequence_parallel
        return module


def apply_cpu_compat() -> None:
    """Install the CPU workarounds (idempotent; a no-op when CUDA is available)."""
    global _CPU_COMPAT_APPLIED
    if _CPU_COMPAT_APPLIED or cuda_available():
        return
    _CPU_COMPAT_APPLIED = True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if transformer_block.LayerNormImpl is WrappedTorchNorm:
        transformer_block.LayerNormImpl = SequenceParallelRMSNorm
    _CudaToCpuMode().__enter__()  # process-global, never exited


@contextlib.contextmanager
def plain_torch():
    """Skip torch-function dispatch (the CPU shim's mode) inside: for code made only of plain torch
    ops on tensors already on the right device (model/lean.py's layer stack). The mode's Python hook
    costs ~3 us on each of the ~150 ops of a decode step; on CUDA there is no mode to skip."""
    if not _CPU_COMPAT_APPLIED:
        yield
        return
    with torch._C.DisableTorchFunction():
        yield


def model_parallel_seed(seed: int) -> None:
    """Seed torch and megatron's model-parallel RNG streams (CUDA tracker on GPU)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if cuda_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    from megatron.core.tensor_parallel import random as mp_random

    tracker = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)
    # Same offsets as megatron's model_parallel_cuda_manual_seed.
    tracker.add("data-parallel-rng", seed)
    tracker.add("model-parallel-rng", seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add("expert-parallel-rng", seed + 1024 + 100 * ps.get_expert_model_parallel_rank()
                + ps.get_expert_tensor_parallel_rank())


# ---------------------------------------------------------------------------------------------
# Initialisation


@dataclasses.dataclass(kw_only=True, slots=True)
class ParallelInfo:
    """Where this process sits in the TP x PP x DP grid."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def initialize(tp: int = 1, pp: int = 1, seed: int = 1234, backend: str = "auto",
               timeout_minutes: float = 10.0) -> ParallelInfo:
    """Init the process group (from torchrun's env, or world 1), megatron parallel_state, seeds."""
    from megatron.core import parallel_state as ps

    if not cuda_available():
        apply_cpu_compat()
    elif "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend=backend_for(backend),
                                rank=int(os.environ.get("RANK", 0)),
                                world_size=int(os.environ.get("WORLD_SIZE", 1)),
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_seed(seed)
    return parallel_info()


def parallel_info() -> ParallelInfo:
    from megatron.core import parallel_state as ps

    return ParallelInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank())


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Broadcast helpers


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """Send any picklable object (a float, a dict) from global rank `src` to every rank.

    Python floats go through pickle, so every rank receives the bit-identical value."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group,
                               device=device() if backend_for() == "nccl" else None)
    return box[0]
