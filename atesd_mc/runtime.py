"""What every stage of a step reads: the model, its teacher, the optimizer, the engine and where
this process sits in the parallel layout. Built once by atesd_mc/trainer.py (and by the
benchmark), then passed to the stage functions of atesd_mc/stages.py explicitly."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from atesd_mc.config import RunConfig
from atesd_mc.distributed import ParallelInfo
from atesd_mc.engine import Engine
from atesd_mc.model.qwen3 import build_stage, local_vocab_range, output_weight, unwrap
from atesd_mc.model.teacher import Teacher


@dataclasses.dataclass(kw_only=True, slots=True)
class Runtime:
    cfg: RunConfig
    info: ParallelInfo
    device: torch.device
    engine: Engine
    vocab: int
    """Real vocabulary size (the output layer is padded beyond it)."""
    eos_id: int | None
    model: torch.nn.Module
    """This rank's unwrapped model stage: the student's weights (LoRA adapters included)."""
    ddp: torch.nn.Module
    """`model` wrapped for training (megatron DDP): what forward/backward passes run."""
    optimizer: Any
    scheduler: Any
    teacher: Teacher

    @property
    def dp(self) -> int:
        return self.info.dp

    @property
    def is_rank0(self) -> bool:
        return self.info.rank == 0


def build_runtime(cfg: RunConfig, info: ParallelInfo, engine: Engine, model, vocab: int,
                  eos_id: int | None) -> Runtime:
    """LoRA adapters, DDP, optimizer, LR schedule and teacher around `model`, which already holds
    its initial weights (random, a warm start or an import)."""
    from atesd_mc.distributed import device
    from atesd_mc.model.lora import add_lora
    from atesd_mc.optim import build_optimizer, build_scheduler, wrap_ddp

    m, p = cfg.model, cfg.parallel
    if m.lora_rank:
        add_lora(model, m.lora_rank, m.lora_alpha, m.lora_targets, cfg.train.seed)
    ddp = wrap_ddp(model, p)
    optimizer = build_optimizer(ddp, cfg.train, p)
    teacher = Teacher(m.resolved_teacher_mode, model, lambda: build_stage(m, p, vocab), m.teacher_ema_decay)
    return Runtime(cfg=cfg, info=info, device=device(), engine=engine, vocab=vocab, eos_id=eos_id,
                   model=model, ddp=ddp, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg.train),
                   teacher=teacher)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OutputWeights:
    student: torch.Tensor
    """This rank's output-layer vocab shard [V_local, h]."""
    teacher: torch.Tensor | None
    """The teacher's own shard, or None when it shares the student's output layer."""
    valid: int
    """Rows of the shard that are real vocabulary (the rest is padding)."""

    @property
    def for_teacher(self) -> torch.Tensor:
        return self.student if self.teacher is None else self.teacher


def output_weights(rt: Runtime) -> OutputWeights:
    shared = rt.teacher.module is unwrap(rt.model)
    _, _, valid = local_vocab_range(rt.model, rt.info.tp_rank, rt.info.tp)
    return OutputWeights(student=output_weight(rt.model),
                         teacher=None if shared else output_weight(rt.teacher.module), valid=valid)


def micro_batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def counts_here(info: ParallelInfo) -> bool:
    """One rank per data-parallel replica contributes to global statistics."""
    return info.tp_rank == 0 and info.is_last_stage


def global_sum(info: ParallelInfo, values, device=None):
    """Sum a dataclass of floats (named fields) over data-parallel replicas in one all-reduce.
    Ranks other than one per replica (counts_here) contribute zeros."""
    names = [f.name for f in dataclasses.fields(values)]
    mine = [float(getattr(values, n)) if counts_here(info) else 0.0 for n in names]
    t = torch.tensor(mine, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return dataclasses.replace(values, **dict(zip(names, t.tolist())))
