"""LoRA adapters: exact no-op at B=0, exact theta_0 when disabled, TP-sharded correctly."""
import torch

from harness import run_distributed
from test_model_parallel import MODEL, VOCAB, _build, _tokens

from atesd_mc.config import ParallelConfig, TrainConfig


def _lora_model(tp=1, targets=("q", "k", "v", "o", "gate", "up", "down")):
    from atesd_mc.model.lora import add_lora

    model = _build(tp)
    add_lora(model, rank=4, alpha=8.0, targets=list(targets), seed=7)
    return model


def _fill_b(model, seed=3):
    """Give every B a deterministic non-zero value, drawn full-size and sliced like the weights."""
    from megatron.core import parallel_state as ps

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for i, (name, ad) in enumerate(sorted(model.lora.adapters.items())):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        column = getattr(ad.B, "tensor_model_parallel", False)
        full = torch.randn(ad.B.shape[0] * (tp if column else 1), ad.B.shape[1], generator=g) * 0.1
        with torch.no_grad():
            ad.B.copy_(full.chunk(tp, 0)[r] if column else full)


def _outputs_b_zero():
    from atesd_mc.model.qwen3 import full_logits

    with torch.no_grad():
        base = full_logits(_build(), _tokens())
        model = _lora_model()
        return base, full_logits(model, _tokens())


def test_lora_b_zero_is_exactly_base():
    base, lora = run_distributed(_outputs_b_zero, world=1)[0]
    assert torch.equal(base, lora)


def _train_step_then_disable():
    from atesd_mc.model.lora import lora_disabled
    from atesd_mc.model.qwen3 import full_logits
    from atesd_mc.optim import build_optimizer, build_scheduler, optimizer_step, wrap_ddp

    model = _lora_model()
    with torch.no_grad():
        theta0 = full_logits(model, _tokens())
    ddp = wrap_ddp(model, ParallelConfig())
    train = TrainConfig(lr=1e-2)
    opt = build_optimizer(ddp, train, ParallelConfig())
    sched = build_scheduler(opt, train)
    tokens = _tokens(b=4, seed=1)
    out = ddp(tokens[:, :-1], torch.arange(tokens.shape[1] - 1).expand(4, -1), None, labels=tokens[:, 1:])
    out.float().mean().backward()
    ddp.finish_grad_sync()
    updated, _, _ = optimizer_step(opt, sched)
    with torch.no_grad():
        after = full_logits(model, _tokens())
        with lora_disabled(model):
            disabled = full_logits(model, _tokens())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return updated, theta0, after, disabled, trainable


def test_disabling_lora_after_a_step_gives_theta0_exactly():
    updated, theta0, after, disabled, trainable = run_distributed(_train_step_then_disable, world=1)[0]
    assert updated
    assert trainable and all(n.startswith("lora.") for n in trainable)
    assert not torch.equal(after, theta0)  # the step changed the student
    assert torch.equal(disabled, theta0)   # adapters off = base weights, bit for bit


def _lora_logits(tp):
    from atesd_mc.model.qwen3 import full_logits

    model = _lora_model(tp)
    _fill_b(model)
    with torch.no_grad():
        return full_logits(model, _tokens())


def test_lora_tp2_equals_tp1():
    ref = run_distributed(_lora_logits, world=1, args=(1,))[0]
    base = run_distributed(_outputs_b_zero, world=1)[0][0]
    assert (ref - base).abs().max() > 1e-3  # the adapters are active
    for out in run_distributed(_lora_logits, world=2, tp=2, args=(2,)):
        assert (out - ref).abs().max().item() <= 1e-5


def _lora_grads(tp):
    """Adapter grads after one backward, gathered to full size for comparison."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from atesd_mc.model.qwen3 import full_logits

    model = _lora_model(tp)
    _fill_b(model)
    logits = full_logits(model, _tokens())
    (logits.float().log_softmax(-1)[..., 0]).mean().backward()
    out = {}
    for name, ad in model.lora.adapters.items():
        for pname in ("A", "B"):
            p = getattr(ad, pname)
            g = p.grad
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                dim = p.partition_dim
                g = torch.cat([t for t in _all_gather(g, ps)], dim=dim)
            out[f"{name}.{pname}"] = g.detach().clone()
    return out


def _all_gather(t, ps):
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return parts


def test_lora_grads_tp2_equal_tp1():
    ref = run_distributed(_lora_grads, world=1, args=(1,))[0]
    for out in run_distributed(_lora_grads, world=2, tp=2, args=(2,)):
        assert set(out) == set(ref)
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-6)
