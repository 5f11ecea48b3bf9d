"""Save and restore a whole training run (issue: exact resume across kills and layouts).

A checkpoint iter_XXXXXXX/ holds
* the dist checkpoint (torch_dist): model (LoRA adapters included), optimizer state (distributed
  optimizer shards too), and the teacher's own weights when they are not derivable (frozen copy, EMA);
* trainer_state.pt (rank 0): step, LR schedule, sampler position, exposure controller (weights, Adam,
  open decisions, EMAs, RNG), held-out accuracy before training, the config, the version, the layout;
* rng_rank<R>.pt: each rank's torch RNG and model-parallel RNG tracker states;
* model_config.json (rank 0): the model description (atesd_mc.model_io), so export-hf, evaluate
  and --finetune know the architecture, vocabulary, adapters and dtype from the checkpoint alone.
Everything is read back with weights_only=True. Rollout sampling is keyed by
(seed, step, global sample index), so a resumed run, on any layout, samples what the uninterrupted run sampled."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import atesd_mc
from atesd_mc import checkpoint as ckpt
from atesd_mc.model.qwen3 import unwrap
from atesd_mc.model_io import saved_adapters, write_model_description

TRAINER_STATE = "trainer_state.pt"


def _sharded(rt, loading: bool, with_optimizer: bool = True) -> dict:
    model = unwrap(rt.model)
    sd = {"model": model.sharded_state_dict()}
    if with_optimizer:
        sd["optimizer"] = rt.optimizer.sharded_state_dict(sd["model"], is_loading=loading)
    if rt.teacher.has_own_weights:
        # Keys as module.load_state_dict takes them back (load() passes them on); sharded keys
        # "teacher.*" as before. An EMA teacher saves its fp32 average (model/teacher.py).
        sd["teacher"] = rt.teacher.sharded_state_dict(prefix="teacher.")
    return sd


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import random as mp_random

    return {"torch": torch.get_rng_state(),
            "tracker": mp_random.get_cuda_rng_tracker().get_states(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0)}


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import random as mp_random

    torch.set_rng_state(state["torch"])
    mp_random.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"])


def save(rt, sampler, exposure, step: int, extra_state: dict | None = None) -> str:
    """Checkpoint of iteration `step` into the run directory; the tracker is updated last.
    rt: the runtime.Runtime; sampler: the data sampler; exposure: the controller (rank 0) or None."""
    root = rt.cfg.run_dir
    path = ckpt.iter_dir(root, step)
    info = rt.info
    state = {"step": step, "scheduler": rt.scheduler.state_dict(),
             "sampler": sampler.state_dict(),
             "exposure": exposure.state_dict() if exposure is not None else None,
             "config": rt.cfg.to_dict(), "version": atesd_mc.__version__,
             "layout": {"tp": info.tp, "pp": info.pp, "dp": info.dp, "world": info.world_size},
             **(extra_state or {})}

    def extra(tmp: str) -> None:
        ckpt.save_torch(_rng_state(), os.path.join(tmp, f"rng_rank{info.rank}.pt"))
        if info.rank == 0:
            ckpt.save_torch(state, os.path.join(tmp, TRAINER_STATE))
            write_model_description(tmp, rt.cfg.model, rt.vocab)

    if ckpt.is_writer():
        os.makedirs(root, exist_ok=True)
    ckpt.barrier()
    ckpt.save_sharded(_sharded(rt, loading=False), path, extra=extra)
    ckpt.write_tracker(root, step)
    return path


def resume_path(cfg) -> tuple[str | None, bool]:
    """(where to load from, weights only?). The run's own checkpoints come first, so a pre-empted
    --finetune run resumes itself; otherwise --load, weights only with --finetune."""
    if ckpt.latest_step(cfg.run_dir) is not None:
        return cfg.run_dir, False
    load = cfg.checkpoint.load
    if load:
        step = ckpt.latest_step(load)
        if step is None:
            raise ckpt.CheckpointError(f"{load}: no {ckpt.TRACKER} here (nothing to --load)")
        if not cfg.checkpoint.finetune:
            _require_training_state(load, ckpt.iter_dir(load, step))
        return load, cfg.checkpoint.finetune
    return None, False


def _require_training_state(root: str, path: str) -> None:
    """A checkpoint without trainer_state.pt holds weights only: resuming it cannot work, starting
    a run from it can (--finetune). One whose checksum list names the file lost it: damage."""
    if os.path.exists(os.path.join(path, TRAINER_STATE)):
        return
    if ckpt.lists_file(path, TRAINER_STATE):
        raise ckpt.CheckpointError(f"{os.path.join(path, TRAINER_STATE)}: missing from the checkpoint")
    raise ckpt.CheckpointError(f"{root} is a weights-only checkpoint (written by import-hf): add "
                               "--finetune to start a run from it")


def _require_same_adapters(rt, path: str) -> None:
    """The model is loaded with strict=False (the sharded load asks only for what the model has),
    so LoRA adapters saved but not configured would be dropped without a word: refuse instead."""
    from atesd_mc.model.lora import lora_of

    saved, ours = saved_adapters(path), lora_of(rt.model) is not None
    if saved != ours:
        raise ckpt.CheckpointError(
            f"{path}: the checkpoint {'has' if saved else 'has no'} LoRA adapters but this run has "
            f"lora_rank {rt.cfg.model.lora_rank}: resume with the run's own --lora-rank, or start a "
            "new run from it with --finetune")


def load(rt, sampler, exposure, root: str) -> dict:
    """Restore model, optimizer, teacher, schedule, sampler, controller and RNG of a training
    checkpoint; returns its trainer state (its "step" is the iteration to continue from).
    (--finetune loads weights only: model_io.load_weights, before LoRA adapters exist.)"""
    cfg = rt.cfg.checkpoint
    step = ckpt.latest_step(root)
    path = ckpt.iter_dir(root, step)
    ckpt.remove_stale_temps(root)
    _require_training_state(root, path)
    ckpt.verify_checkpoint(path)
    state = ckpt.load_torch(os.path.join(path, TRAINER_STATE))
    _require_same_adapters(rt, path)
    with_opt = not cfg.no_load_optim
    loaded = ckpt.load_sharded_checked(_sharded(rt, loading=True, with_optimizer=with_opt), path)
    unwrap(rt.model).load_state_dict(loaded["model"], strict=False)
    if "teacher" in loaded:
        rt.teacher.module.load_state_dict(loaded["teacher"], strict=False)
    if with_opt:
        rt.optimizer.load_state_dict(loaded["optimizer"])
        rt.scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    if exposure is not None and state.get("exposure") is not None:
        exposure.load_state_dict(state["exposure"])
    info = rt.info
    same_layout = state["layout"]["world"] == info.world_size and \
        state["layout"]["tp"] == info.tp and state["layout"]["pp"] == info.pp
    rng_file = os.path.join(path, f"rng_rank{info.rank}.pt")
    if not cfg.no_load_rng and same_layout and os.path.exists(rng_file):
        _set_rng_state(ckpt.load_torch(rng_file))
    if dist.is_initialized():
        dist.barrier()
    state["step"] = int(state["step"])
    return state
