"""megatron-core DDP, optimizer and LR schedule for a model stage."""
from __future__ import annotations

import torch

from atesd_mc.config import ParallelConfig, TrainConfig


def wrap_ddp(model, par: ParallelConfig):
    """megatron DistributedDataParallel: grads averaged over DP in fp32 buffers."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    cfg = model.config
    if cfg.bf16:
        model = Float16Module(cfg, model)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=par.use_distributed_optimizer,
        overlap_grad_reduce=False, check_for_nan_in_grad=False)
    ddp = DistributedDataParallel(cfg, ddp_cfg, model)
    from megatron.core.distributed import finalize_model_grads

    cfg.finalize_model_grads_func = finalize_model_grads
    return ddp


def build_optimizer(ddp_model, train: TrainConfig, par: ParallelConfig, *, lr: float | None = None):
    """AdamW (megatron's, with global-norm clipping over all TP/PP ranks)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = ddp_model.config
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=lr if lr is not None else train.lr, min_lr=train.min_lr,
        weight_decay=train.weight_decay, adam_beta1=0.9, adam_beta2=train.adam_beta2, adam_eps=1e-8,
        clip_grad=train.clip_grad, bf16=cfg.bf16, params_dtype=cfg.params_dtype,
        use_distributed_optimizer=par.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_cfg, [ddp_model])
    _fuse_cpu_adam(optimizer)
    return optimizer


def _fuse_cpu_adam(optimizer) -> None:
    """Without TE/apex, megatron falls back to torch's AdamW (an Adam subclass), which on CPU updates one tensor at a
    time (foreach is a CUDA default); its fused CPU kernel does the same update ~3x faster on the
    tiny model (megatron's own CPU-offload optimizer picks it for that reason). GPU: unchanged."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = getattr(inner, "optimizer", None)
        if not isinstance(adam, torch.optim.Adam) or adam.state:
            continue
        params = [p for g in adam.param_groups for p in g["params"]]
        if params and all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in params):
            for group in adam.param_groups:
                group["foreach"], group["fused"] = False, True


def build_scheduler(optimizer, train: TrainConfig, *, lr: float | None = None, iters: int | None = None,
                    warmup: int | None = None, min_lr: float | None = None):
    """Linear warm-up then cosine decay to min_lr (megatron's OptimizerParamScheduler); the
    training schedule by default, or another (the warm start) through the keyword arguments."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    peak = lr if lr is not None else train.lr
    steps = max(iters if iters is not None else train.train_iters, 1)
    warmup = min(train.lr_warmup_iters if warmup is None else warmup, steps - 1)
    floor = min(train.min_lr if min_lr is None else min_lr, peak)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else peak, max_lr=peak, min_lr=floor,
        lr_warmup_steps=warmup, lr_decay_steps=steps, lr_decay_style="cosine",
        start_wd=train.weight_decay, end_wd=train.weight_decay, wd_incr_steps=steps,
        wd_incr_style="constant",
        # A resumed run follows the flags' schedule (a larger --train-iters extends the decay), as
        # with megatron's --override-opt_param-scheduler; the step count still comes from the
        # checkpoint. The trainer logs what changed (trainer.schedule_changes).
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)


def zero_grads(ddp_model, optimizer) -> None:
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()


def optimizer_step(optimizer, scheduler, increment: int = 1) -> tuple[bool, float, int]:
    """(updated, grad norm, zeros); megatron skips the update itself on inf/nan grad norms."""
    updated, grad_norm, num_zeros = optimizer.step()
    if updated:
        scheduler.step(increment=increment)
    return bool(updated), float(grad_norm) if grad_norm is not None else float("nan"), num_zeros


def count_params(model) -> tuple[int, int]:
    """(total, trainable) parameters of this stage."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


__all__ = ["wrap_ddp", "build_optimizer", "build_scheduler", "zero_grads", "optimizer_step",
           "count_params", "torch"]
