"""The Qwen3 megatron model gives one rank's numbers under TP=2, PP=2 and DP=2 (gloo, 2 ranks)."""
import torch

from harness import run_distributed

from atesd_mc.config import ModelConfig, ParallelConfig

VOCAB = 500  # pads to 512 at TP=1 and TP=2: same init draws, and padding is exercised
MODEL = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
             num_query_groups=2, kv_channels=24, seq_length=32)  # head_dim != hidden/heads


def _tokens(b=3, s=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, s), generator=g)


def _build(tp=1, pp=1, **kw):
    from atesd_mc.model.qwen3 import build_stage

    from atesd_mc import distributed
    distributed.model_parallel_seed(1234)
    return build_stage(ModelConfig(**{**MODEL, **kw}), ParallelConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), VOCAB)


def _logits(tp, untie):
    from atesd_mc.model.qwen3 import full_logits

    model = _build(tp, untie_embeddings_and_output_weights=untie)
    with torch.no_grad():
        return full_logits(model, _tokens())


def _single_rank(fn, *args):
    return run_distributed(fn, world=1, args=args)[0]


def test_tp2_logits_equal_tp1():
    for untie in (False, True):
        ref = _single_rank(_logits, 1, untie)
        out = run_distributed(_logits, world=2, tp=2, args=(2, untie))
        assert ref.shape == (3, 17, VOCAB)
        for o in out:
            assert (o - ref).abs().max().item() <= 1e-5


def _loss_and_grads(tp, pp, state=None):
    """LM loss and full gradients through megatron's pipeline schedule (untied embeddings: with
    tied ones the first and last stage each hold a partial embedding grad until DDP sums them)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = _build(tp, pp, untie_embeddings_and_output_weights=True)
    if state is not None:
        _load_full_state(model, state)
    tokens = _tokens(b=4)
    micro = list(torch.chunk(tokens, 2))
    losses = []

    def step(it, m):
        batch = next(it)
        out = m(batch[:, :-1], torch.arange(batch.shape[1] - 1).expand(batch.shape[0], -1), None,
                labels=batch[:, 1:])

        def loss_fn(o):
            loss = o.float().mean()
            losses.append(loss.detach().clone())
            return loss, {}
        return out, loss_fn

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter(micro), model=[model],
                                num_microbatches=2, seq_length=tokens.shape[1] - 1,
                                micro_batch_size=2, forward_only=False)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss = torch.stack(losses).mean() if losses else None
    return loss, (grads, ps.get_pipeline_model_parallel_rank())


def _full_state():
    model = _build(untie_embeddings_and_output_weights=True)
    return {k: v.clone() for k, v in model.state_dict().items() if v is not None and torch.is_tensor(v)}


def _load_full_state(model, full):
    """Load a TP1/PP1 state into a PP stage (layer numbers shift by the stage offset)."""
    from megatron.core import parallel_state as ps

    offset = ps.get_pipeline_model_parallel_rank() * (MODEL["num_layers"] // ps.get_pipeline_model_parallel_world_size())
    own = model.state_dict()
    new = {}
    for k in own:
        if not torch.is_tensor(own[k]):
            continue
        src = k
        if k.startswith("decoder.layers."):
            parts = k.split(".")
            parts[2] = str(int(parts[2]) + offset)
            src = ".".join(parts)
        new[k] = full[src]
    model.load_state_dict(new, strict=False)


def test_pp2_loss_and_grads_equal_pp1():
    state = _single_rank(_full_state)
    ref_loss, (ref_grads, _) = _single_rank(_loss_and_grads, 1, 1, state)
    out = run_distributed(_loss_and_grads, world=2, pp=2, args=(1, 2, state))
    last_loss = [o[0] for o in out if o[0] is not None]
    assert len(last_loss) == 1 and abs(last_loss[0].item() - ref_loss.item()) < 1e-6
    seen = set()
    for loss, (grads, pp_rank) in out:
        offset = pp_rank * 1
        for name, g in grads.items():
            ref_name = name
            if name.startswith("decoder.layers."):
                parts = name.split(".")
                parts[2] = str(int(parts[2]) + offset)
                ref_name = ".".join(parts)
            torch.testing.assert_close(g, ref_grads[ref_name], rtol=1e-5, atol=1e-6)
            seen.add(ref_name)
    assert seen == set(ref_grads)  # every parameter's gradient was compared


def _dp_grads(dp_world):
    """Main grads after megatron DDP's gradient sync, for this rank's half of the batch."""
    import torch.distributed as dist

    from atesd_mc.optim import wrap_ddp

    model = _build(1, 1)
    ddp = wrap_ddp(model, ParallelConfig())
    tokens = _tokens(b=4)
    if dp_world == 2:
        tokens = tokens.chunk(2)[dist.get_rank()]
    out = ddp(tokens[:, :-1], torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1), None,
              labels=tokens[:, 1:])
    out.float().mean().backward()
    ddp.finish_grad_sync()
    return {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}


def test_dp2_grads_equal_one_rank_on_concatenated_batch():
    ref = _single_rank(_dp_grads, 1)
    out = run_distributed(_dp_grads, world=2, args=(2,))
    for grads in out:
        assert set(grads) == set(ref)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-7)
