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
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from atesd_mc.config_check import ConfigError

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
# Launchers: which rank this process is, and which GPU it takes (docs/PLATFORM.md, Launchers)


class LaunchError(ConfigError):
    """The launcher's variables do not describe a usable process. A ConfigError, so the CLIs
    print it as one `error: ...` line and exit 2."""


@dataclasses.dataclass(frozen=True, slots=True)
class LaunchEnv:
    """This process as its launcher describes it."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int | None  # None: nothing says; the device is then rank % visible GPUs
    local_var: str | None  # the variable local_rank came from, for messages


# (launcher, rank, world size, local rank). Innermost launcher first: torchrun started by srun
# (examples/launch_slurm.sbatch) also sees srun's SLURM_*, and the ranks of an mpirun inside an
# allocation inherit the SLURM_* of the step or batch script that ran mpirun. srun's world is the
# step's task count (the allocation's SLURM_NTASKS can be larger); a batch script has SLURM_PROCID
# but no step variables, so a single process started there is world 1.
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("mpirun (Open MPI)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpirun (MVAPICH2)", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
)


def _env_int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    if name not in env:
        return default
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None


def launch_env(env: Mapping[str, str]) -> LaunchEnv:
    """Rank, world size and local rank from the first launcher in _LAUNCHERS that set its rank or
    world size; none: a single process. LOCAL_RANK stands in when the launcher gives no local rank."""
    found = next((row for row in _LAUNCHERS if row[1] in env or row[2] in env), None)
    if found is None:
        found = ("no launcher", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    launcher, rank_var, world_var, local_var = found
    rank, world = _env_int(env, rank_var, 0), _env_int(env, world_var, 1)
    if world > 1 and rank_var not in env:
        raise LaunchError(f"{world_var}={world} is set but {rank_var} is not ({launcher})")
    if not 0 <= rank < world:
        raise LaunchError(f"{rank_var}={rank} is not a rank of a world of {world} ({launcher})")
    if local_var not in env:
        local_var = "LOCAL_RANK" if "LOCAL_RANK" in env else None
    local = _env_int(env, local_var, None) if local_var else None
    if local is not None and local < 0:
        raise LaunchError(f"{local_var}={local} is negative")
    return LaunchEnv(launcher=launcher, rank=rank, world_size=world, local_rank=local, local_var=local_var)


def local_device_index(env: Mapping[str, str], n_visible: int) -> int:
    """The CUDA device index, of the n_visible this process sees, that it computes on."""
    launch = launch_env(env)
    shown = (f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env
             else "CUDA_VISIBLE_DEVICES unset")
    if n_visible < 1:
        raise LaunchError(f"rank {launch.rank} sees no GPU ({shown})")
    if launch.local_rank is None:
        return launch.rank % n_visible  # ranks laid out node by node, one per GPU
    if n_visible == 1:
        return 0  # the launcher gave each process its own GPU (srun --gpus-per-task=1, a wrapper)
    if launch.local_rank >= n_visible:
        raise LaunchError(f"local rank {launch.local_rank} ({launch.local_var}) but only {n_visible} "
                          f"GPUs are visible ({shown}): start at most one process per GPU on a node")
    return launch.local_rank


def check_rendezvous(env: Mapping[str, str], launch: LaunchEnv) -> None:
    """Ranks of a world > 1 meet at MASTER_ADDR:MASTER_PORT; torchrun sets both, srun and mpirun
    do not, and a default (localhost, a free port) would differ between ranks and hang."""
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in env]
    if launch.world_size > 1 and missing:
        raise LaunchError(f"world size {launch.world_size} from {launch.launcher} but "
                          f"{' and '.join(missing)} not set: export MASTER_ADDR=<host of rank 0> "
                          f"MASTER_PORT=<free port> for every rank")


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
    """Init the process group (from torchrun's, srun's or mpirun's env, or world 1), megatron
    parallel_state, seeds. A group made by the caller is used as it is, device included."""
    from megatron.core import parallel_state as ps

    if not cuda_available():
        apply_cpu_compat()
    if not dist.is_initialized():
        launch = launch_env(os.environ)
        check_rendezvous(os.environ, launch)
        if cuda_available():
            # Before the group exists: NCCL binds each rank's communicator to the current device.
            torch.cuda.set_device(local_device_index(os.environ, torch.cuda.device_count()))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend=backend_for(backend), rank=launch.rank,
                                world_size=launch.world_size,
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
    dist.broadcast_object_list(box, src=src, group=group, device=_object_device(dist.get_backend(group)))
    return box[0]


def _object_device(group_backend: str) -> torch.device | None:
    """Where the pickled bytes travel: NCCL moves only CUDA tensors (the current device, which
    initialize set); gloo and mixed "cpu:gloo,cuda:nccl" groups take CPU ones (None: torch's CPU)."""
    return device() if group_backend == "nccl" else None
