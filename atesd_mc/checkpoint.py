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
        write_checksums(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    barrier()


# ---------------------------------------------------------------------------------------------
# Integrity: a checksum of every file, written last inside the temp directory, checked on load.

CHECKSUMS = "checksums.json"


def _crc32(path: str) -> int:
    import zlib

    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checksums(directory: str) -> None:
    import json

    entries = {}
    for base, _, files in os.walk(directory):
        for name in files:
            full = os.path.join(base, name)
            with open(full, "rb") as f:  # make the shards durable before the rename publishes them
                os.fsync(f.fileno())
            entries[os.path.relpath(full, directory)] = {"size": os.path.getsize(full), "crc32": _crc32(full)}
    save_text(os.path.join(directory, CHECKSUMS), json.dumps(entries, indent=0, sort_keys=True))
    fsync_dir(directory)


def verify_checksums(directory: str) -> str | None:
    """The first problem found (naming the file), or None. Checkpoints without checksums pass."""
    import json

    listing = os.path.join(directory, CHECKSUMS)
    if not os.path.exists(listing):
        return None
    try:
        entries = json.load(open(listing))
    except (OSError, ValueError) as e:
        return f"{listing}: unreadable checksum list ({e})"
    for rel, want in sorted(entries.items()):
        full = os.path.join(directory, rel)
        if not os.path.exists(full):
            return f"{full}: missing from the checkpoint"
        if os.path.getsize(full) != want["size"]:
            return f"{full}: truncated or overwritten ({os.path.getsize(full)} bytes, expected {want['size']})"
        if _crc32(full) != want["crc32"]:
            return f"{full}: corrupted (checksum mismatch)"
    return None


def lists_file(directory: str, name: str) -> bool:
    """Whether the checkpoint's checksum list names `name` (it was written with the checkpoint)."""
    import json

    try:
        with open(os.path.join(directory, CHECKSUMS)) as f:
            return name in json.load(f)
    except (OSError, ValueError):
        return False


def verify_checkpoint(directory: str) -> None:
    """Rank 0 checks every file; all ranks raise the same CheckpointError."""
    problem = verify_checksums(directory) if is_writer() else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise CheckpointError(problem)


def remove_stale_temps(root: str) -> None:
    """iter_*.tmp left by a save that was killed: never part of a checkpoint."""
    if is_writer() and os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith("iter_") and name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Loading across layer specs. Transformer-engine modules keep fp8 scaling metadata as `_extra_state`
# (saved as ShardedObjects), which modules of other specs lack or leave None. A checkpoint made on
# CPU (local spec) thus lacks some of the `_extra_state` a TE model asks for, and a TE checkpoint
# holds some that a local model never asks for (dist_checkpointing loads only what is asked).
# Exactly those may be absent: the TE module then keeps its fresh metadata. Weights stay strict.

EXTRA_STATE = "_extra_state"


def _is_extra_state(key: str) -> bool:
    return key.endswith(EXTRA_STATE)  # megatron's test too (make_sharded_tensors_for_checkpoint)


def checkpoint_keys(path: str) -> set[str]:
    """The sharded keys (tensors and objects) the checkpoint at path holds, from its metadata."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return {v.key for v in load_sharded_metadata(path).values()}


def _drop_absent_extra_state(tree, present: set[str]):
    """`tree` (a sharded state dict) without the `_extra_state` objects whose key is not in
    `present`; a new dict, the caller's is left as it was."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if isinstance(tree, dict):
        return {k: _drop_absent_extra_state(v, present) for k, v in tree.items()
                if not (isinstance(v, ShardedObject) and _is_extra_state(v.key) and v.key not in present)}
    if isinstance(tree, list):  # megatron keeps no `_extra_state` in lists: positions stay as they are
        return [_drop_absent_extra_state(v, present) for v in tree]
    return tree


def _asked_keys(tree) -> set[str]:
    """Keys of the tensors and objects a sharded state dict asks for (factories build theirs
    at load time: not listed, the load itself checks them)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    return {v.key for v in nested_values(tree) if isinstance(v, (ShardedTensor, ShardedObject))}


def load_sharded(sharded_state_dict: dict, path: str) -> dict:
    """dist_checkpointing.load of `sharded_state_dict` from path. Every tensor asked for must be
    there; an `_extra_state` it lacks is left out of the result (see above). Missing entries are
    named after the load failed: it fails on every rank, whereas a check before it would stop only
    the ranks whose stage misses something and leave the others waiting in its collectives."""
    from megatron.core import dist_checkpointing

    present = checkpoint_keys(path)
    sharded_state_dict = _drop_absent_extra_state(sharded_state_dict, present)
    try:
        return dist_checkpointing.load(sharded_state_dict, path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: B036 - torch's CheckpointException is a BaseException
        missing = sorted(_asked_keys(sharded_state_dict) - present)
        if not missing:
            raise
    raise CheckpointError(f"{path}: lacks {len(missing)} entries the model has, e.g. {missing[:3]} "
                          "(written by a different model or layer layout?)")


def load_module_state(module, state_dict: dict, path: str) -> None:
    """module.load_state_dict(state_dict) for a state dict that load_sharded returned: strict,
    except that `_extra_state` entries may be missing (absent from the checkpoint, or never in the
    module's sharded state dict, as TE's core attention's). CheckpointError names the keys."""
    result = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not _is_extra_state(k)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: does not fit the model: missing {missing[:4]} "
                              f"({len(missing)} in all), unexpected {result.unexpected_keys[:4]} "
                              f"({len(result.unexpected_keys)} in all)")


# ---------------------------------------------------------------------------------------------
# Training checkpoints in Megatron's layout: SAVE/iter_0000100/ + latest_checkpointed_iteration.txt

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read; the message names the file."""


def iter_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def read_tracker(root: str) -> int | None:
    """The step the tracker file names (None: no tracker); CheckpointError if it is not a number."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        return None
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def latest_step(root: str) -> int | None:
    """Step named by the tracker file, or None when there is no checkpoint under root."""
    step = read_tracker(root)
    if step is not None and not os.path.isdir(iter_dir(root, step)):
        raise CheckpointError(f"{os.path.join(root, TRACKER)}: names iteration {step} but "
                              f"{iter_dir(root, step)} is missing")
    return step


def write_tracker(root: str, step: int) -> None:
    """Updated last, atomically: a kill before this leaves the previous checkpoint current."""
    if is_writer():
        save_text(os.path.join(root, TRACKER), f"{step}\n")
        fsync_dir(root)
    barrier()


def save_torch(obj, path: str) -> None:
    import torch

    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
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
    """load_sharded after the checksum check, failures turned into one line naming the file
    (torch's CheckpointException is a BaseException, hence the wide except)."""
    verify_checkpoint(path)
    try:
        return load_sharded(sharded_state_dict, path)
    except (KeyboardInterrupt, SystemExit, CheckpointError):
        raise
    except BaseException as e:  # noqa: B036
        text = str(e).strip()
        first = text.splitlines()[0][:300] if text else type(e).__name__
        raise CheckpointError(f"{path}: cannot load the sharded checkpoint ({type(e).__name__}: {first})") from None
