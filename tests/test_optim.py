"""megatron's optimizer on CPU: torch's fused AdamW kernel, the same updates as the per-tensor loop."""
import torch

from harness import run_distributed
from test_model_parallel import _build

from atesd_mc.config import ParallelConfig, TrainConfig


def _three_steps():
    from atesd_mc.optim import build_optimizer, build_scheduler, optimizer_step, wrap_ddp, zero_grads

    model = _build()
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ddp = wrap_ddp(model, ParallelConfig())
    # min_lr = lr: a constant rate, so the float64 reference needs no schedule
    train = TrainConfig(lr=1e-2, min_lr=1e-2, weight_decay=0.1, adam_beta2=0.98, clip_grad=0.0)
    opt = build_optimizer(ddp, train, ParallelConfig())
    sched = build_scheduler(opt, train)
    fused = [g["fused"] for inner in opt.chained_optimizers for g in inner.optimizer.param_groups]
    params = dict(ddp.module.named_parameters())
    grads = []
    for step in range(3):
        zero_grads(ddp, opt)
        g = torch.Generator().manual_seed(step)
        grads.append({n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()})
        for n, p in params.items():
            p.main_grad.copy_(grads[-1][n])
        optimizer_step(opt, sched)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    return fused, start, grads, {n: p.detach().double() for n, p in params.items()}, \
        [g["lr"] for g in opt.param_groups], {n: decay[id(p)] for n, p in params.items()}


def _reference_adamw(start, grads, lr, beta2, decay, eps=1e-8, beta1=0.9):
    """AdamW in float64, written out (decoupled weight decay, bias correction)."""
    out = {}
    for n, p in start.items():
        wd = decay[n]
        p, m, v = p.clone(), torch.zeros_like(p), torch.zeros_like(p)
        for t, g in enumerate(grads, start=1):
            g = g[n]
            p = p * (1 - lr * wd)
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            p = p - lr * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
        out[n] = p
    return out


def test_cpu_adam_is_fused_and_matches_float64_adamw():
    fused, start, grads, after, lr, decay = run_distributed(_three_steps, world=1)[0]
    assert fused and all(fused)
    assert lr and all(x == 1e-2 for x in lr)
    assert set(decay.values()) == {0.0, 0.1}  # megatron exempts norms from weight decay
    ref = _reference_adamw(start, grads, 1e-2, 0.98, decay)
    for n, p in after.items():
        assert (p - start[n]).abs().max() > 1e-3, n  # every parameter moved
        assert (p - ref[n]).abs().max() <= 1e-6, n
