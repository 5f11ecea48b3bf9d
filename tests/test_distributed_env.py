"""Launch variables -> rank, world size and GPU (atesd_mc/distributed.py, docs/PLATFORM.md Launchers).

The environments are the ones torchrun, srun and mpirun give a rank; nothing here needs a GPU
except the one test marked so."""
import multiprocessing as mp
import os
import pickle
import struct
import traceback

import pytest
import torch

from atesd_mc import distributed
from atesd_mc.config import ConfigError
from atesd_mc.distributed import LaunchEnv, LaunchError, check_rendezvous, launch_env, local_device_index
from harness import run_distributed

# srun -N2 --ntasks-per-node=8 in an allocation of 32 tasks: the third rank of the second node.
SRUN = {"SLURM_PROCID": "10", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "2", "SLURM_NTASKS": "32",
        "SLURM_JOB_ID": "77"}
# What an sbatch script itself sees (no job step): SLURM_PROCID=0 and the allocation's task count.
BATCH_SCRIPT = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "77"}
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "13", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "5"}
MVAPICH = {"MV2_COMM_WORLD_RANK": "6", "MV2_COMM_WORLD_SIZE": "8", "MV2_COMM_WORLD_LOCAL_RANK": "2"}
TORCHRUN = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
EIGHT = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}


@pytest.mark.parametrize("env, expected", [
    ({}, LaunchEnv(launcher="no launcher", rank=0, world_size=1, local_rank=None, local_var=None)),
    (TORCHRUN, LaunchEnv(launcher="torchrun", rank=9, world_size=16, local_rank=1, local_var="LOCAL_RANK")),
    (SRUN, LaunchEnv(launcher="srun", rank=10, world_size=16, local_rank=2, local_var="SLURM_LOCALID")),
    (OPEN_MPI, LaunchEnv(launcher="mpirun (Open MPI)", rank=13, world_size=16, local_rank=5,
                         local_var="OMPI_COMM_WORLD_LOCAL_RANK")),
    (MVAPICH, LaunchEnv(launcher="mpirun (MVAPICH2)", rank=6, world_size=8, local_rank=2,
                        local_var="MV2_COMM_WORLD_LOCAL_RANK")),
])
def test_each_launcher_maps_rank_world_and_local_rank(env, expected):
    assert launch_env(env) == expected


def test_innermost_launcher_wins():
    # examples/launch_slurm.sbatch: srun starts one torchrun per node; torchrun's ranks see both.
    srun_one_per_node = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0"}
    got = launch_env({**srun_one_per_node, **TORCHRUN})
    assert (got.launcher, got.rank, got.world_size, got.local_rank) == ("torchrun", 9, 16, 1)
    # mpirun inside an allocation: its ranks inherit the SLURM_* of whatever ran mpirun.
    got = launch_env({**srun_one_per_node, **OPEN_MPI})
    assert (got.launcher, got.rank, got.world_size, got.local_rank) == ("mpirun (Open MPI)", 13, 16, 5)
    assert launch_env({**MVAPICH, **OPEN_MPI}).launcher == "mpirun (Open MPI)"


def test_batch_script_process_is_a_single_rank():
    # The allocation's SLURM_NTASKS=16 must not make one python in the batch script wait for 15 more.
    got = launch_env(BATCH_SCRIPT)
    assert (got.rank, got.world_size) == (0, 1)
    assert local_device_index({**BATCH_SCRIPT, **EIGHT}, 8) == 0


def test_local_rank_precedence_and_device():
    assert local_device_index({**TORCHRUN, **EIGHT}, 8) == 1
    assert local_device_index({**SRUN, **EIGHT}, 8) == 2
    assert local_device_index({**OPEN_MPI, **EIGHT}, 8) == 5
    assert local_device_index({**MVAPICH, **EIGHT}, 8) == 2
    # A LOCAL_RANK left in the environment does not override srun's own local rank ...
    assert local_device_index({**SRUN, "LOCAL_RANK": "0"}, 8) == 2
    # ... but stands in where nothing else gives one (a single process, as before this change).
    assert local_device_index({"LOCAL_RANK": "3"}, 8) == 3
    assert launch_env({"SLURM_PROCID": "4", "SLURM_STEP_NUM_TASKS": "8", "LOCAL_RANK": "4"}).local_var \
        == "LOCAL_RANK"


def test_rank_modulo_visible_gpus_without_a_local_rank():
    # RANK/WORLD_SIZE exported by hand, 8 GPUs a node: global rank 13 is the sixth GPU of node 1.
    assert local_device_index({"RANK": "13", "WORLD_SIZE": "16"}, 8) == 5
    assert local_device_index({"RANK": "13", "WORLD_SIZE": "16"}, 4) == 1
    assert local_device_index({}, 8) == 0


def test_one_visible_gpu_is_the_process_own():
    # srun --gpus-per-task=1 (or a wrapper setting CUDA_VISIBLE_DEVICES per rank): each task sees one.
    assert local_device_index({**SRUN, "CUDA_VISIBLE_DEVICES": "2"}, 1) == 0
    assert local_device_index({**OPEN_MPI, "CUDA_VISIBLE_DEVICES": "5"}, 1) == 0


def _one_line_error(env, n_visible):
    with pytest.raises(LaunchError) as info:
        local_device_index(env, n_visible)
    assert isinstance(info.value, ConfigError)  # the CLIs print ConfigError as `error: ...`, exit 2
    message = str(info.value)
    assert "\n" not in message
    return message


def test_local_rank_beyond_visible_gpus_is_one_line():
    env = {**SRUN, "SLURM_LOCALID": "9", **EIGHT}
    assert _one_line_error(env, 8) == ("local rank 9 (SLURM_LOCALID) but only 8 GPUs are visible "
                                       "(CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7): start at most one "
                                       "process per GPU on a node")
    assert _one_line_error({**TORCHRUN, "LOCAL_RANK": "2"}, 2).startswith(
        "local rank 2 (LOCAL_RANK) but only 2 GPUs are visible (CUDA_VISIBLE_DEVICES unset)")
    assert _one_line_error({}, 0) == "rank 0 sees no GPU (CUDA_VISIBLE_DEVICES unset)"


@pytest.mark.parametrize("env, message", [
    ({"RANK": "x1", "WORLD_SIZE": "2"}, "RANK='x1' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not a rank of a world of 2 (torchrun)"),
    ({"RANK": "1"}, "RANK=1 is not a rank of a world of 1 (torchrun)"),
    ({"WORLD_SIZE": "4"}, "WORLD_SIZE=4 is set but RANK is not (torchrun)"),
    ({**SRUN, "SLURM_LOCALID": "-1"}, "SLURM_LOCALID=-1 is negative"),
])
def test_inconsistent_variables_are_named(env, message):
    with pytest.raises(LaunchError) as info:
        launch_env(env)
    assert str(info.value) == message


def test_rendezvous_address_required_beyond_one_rank():
    check_rendezvous({}, launch_env({}))  # world 1: initialize picks localhost and a free port
    check_rendezvous(TORCHRUN, launch_env(TORCHRUN))
    check_rendezvous({**SRUN, "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}, launch_env(SRUN))
    with pytest.raises(LaunchError) as info:
        check_rendezvous(SRUN, launch_env(SRUN))
    assert str(info.value) == ("world size 16 from srun but MASTER_ADDR and MASTER_PORT not set: export "
                               "MASTER_ADDR=<host of rank 0> MASTER_PORT=<free port> for every rank")
    with pytest.raises(LaunchError, match=r"^world size 16 from mpirun \(Open MPI\) but MASTER_PORT not set"):
        check_rendezvous({**OPEN_MPI, "MASTER_ADDR": "node0"}, launch_env(OPEN_MPI))


# ---------------------------------------------------------------------------------------------
# broadcast_object follows the group's backend


def test_object_device_follows_the_group_backend(monkeypatch):
    cuda3 = torch.device("cuda", 3)  # a device object only; nothing is allocated on it
    monkeypatch.setattr(distributed, "device", lambda: cuda3)
    assert distributed._object_device("nccl") == cuda3
    assert distributed._object_device("gloo") is None
    assert distributed._object_device("cpu:gloo,cuda:nccl") is None  # torch stages those on CPU


def _broadcast_on_gloo_where_nccl_is_configured():
    import torch.distributed as dist

    # A CUDA machine whose configured backend is NCCL, with this group on gloo: a device that is
    # not CPU ("meta" stands for CUDA here) must not be used for the gloo broadcast.
    distributed.backend_for = lambda requested="auto": "nccl"
    distributed.device = lambda: torch.device("meta")
    value = 0.1234567891234567 if dist.get_rank() == 0 else None
    return struct.pack("<d", distributed.broadcast_object(value))


def test_gloo_group_broadcast_stays_on_cpu_bit_identical():
    out = run_distributed(_broadcast_on_gloo_where_nccl_is_configured, world=2, megatron=False)
    assert out[0] == out[1] == struct.pack("<d", 0.1234567891234567)


# ---------------------------------------------------------------------------------------------
# initialize() under srun's variables (no torchrun), two forked gloo ranks


def _srun_rank(rank: int, port: int, queue) -> None:
    try:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(name, None)
        os.environ.update(SLURM_PROCID=str(rank), SLURM_STEP_NUM_TASKS="2", SLURM_LOCALID=str(rank),
                          SLURM_NTASKS="4", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        info = distributed.initialize(backend="gloo", timeout_minutes=2)
        got = distributed.broadcast_object(2.0 ** -40 + 1 / 3 if rank == 0 else None)
        queue.put((rank, "ok", pickle.dumps((info.rank, info.world_size, struct.pack("<d", got)))))
        distributed.shutdown()
    except BaseException:
        queue.put((rank, "err", traceback.format_exc()))


def test_initialize_takes_rank_and_world_from_srun():
    from harness import _free_port

    ctx = mp.get_context("fork")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_srun_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in procs:
            rank, status, value = queue.get(timeout=120)  # a guard against a hang, not a measurement
            assert status == "ok", value
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    expected = struct.pack("<d", 2.0 ** -40 + 1 / 3)
    assert results == {0: (0, 2, expected), 1: (1, 2, expected)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_index_is_the_current_device():
    n = torch.cuda.device_count()
    before = torch.cuda.current_device()
    index = local_device_index({"SLURM_PROCID": str(n - 1), "SLURM_STEP_NUM_TASKS": str(n),
                                "SLURM_LOCALID": str(n - 1)}, n)
    assert index == n - 1
    try:
        torch.cuda.set_device(index)
        assert distributed.device() == torch.device("cuda", n - 1)
        assert distributed._object_device("nccl") == torch.device("cuda", n - 1)
        assert distributed._object_device("gloo") is None
    finally:
        torch.cuda.set_device(before)
