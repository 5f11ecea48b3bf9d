"""The plain-torch model path (atesd_mc/model/lean.py) equals megatron's layers: logits at every
position, sampled tokens, gradients; and it runs only on settings on its allow-list."""
import torch

from harness import run_distributed
from test_lora import _fill_b, _lora_model
from test_model_parallel import VOCAB, _build

from atesd_mc.generation import SamplingParams, generate

# head_dim 12 != hidden/heads (64/4), 4 query heads in 2 groups: the fused-QKV layout and GQA matter.
ODD = dict(hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=12)


def _rows(n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n, 23), generator=g)


def _lean_vs_full(model):
    """Logits of every position: chunked prefill (9 tokens) then one token at a time, vs full_logits."""
    from atesd_mc.model.lean import LeanDecoder, unsupported
    from atesd_mc.model.qwen3 import full_logits, unwrap

    inner = unwrap(model)
    assert unsupported(inner) is None
    rows = _rows()
    with torch.no_grad():
        ref = full_logits(model, rows)  # [b, s, V_real]
        dec = LeanDecoder(inner, rows.shape[0], rows.shape[1])
        got = [dec.forward(rows[:, :9], 0)]
        got += [dec.forward(rows[:, p:p + 1], p) for p in range(9, rows.shape[1])]
    got = torch.stack(got, 1)[..., :VOCAB]
    return (got - ref[:, 8:]).abs().max().item(), ref.abs().max().item()


def _plain(untie, kw):
    return _lean_vs_full(_build(untie_embeddings_and_output_weights=untie, **kw))


def test_lean_logits_equal_megatron_tied_untied_odd_head_dim():
    for untie in (False, True):
        for kw in ({}, ODD):
            err, scale = run_distributed(_plain, world=1, args=(untie, kw))[0]
            assert scale > 0.1 and err <= 1e-5, (untie, kw, err)


def _lora():
    from atesd_mc.model.lora import lora_disabled

    model = _lora_model()
    _fill_b(model)
    on = _lean_vs_full(model)
    with lora_disabled(model):
        off = _lean_vs_full(model)
    return on, off


def test_lean_logits_follow_lora_hooks_on_and_off():
    on, off = run_distributed(_lora, world=1)[0]
    assert on[0] <= 1e-5 and off[0] <= 1e-5


def _sampled(engine, seed):
    model = _build(**ODD)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 11, 8, 17)]
    params = SamplingParams(max_new_tokens=12, temperature=1.1, top_p=0.95, top_k=20, eos_id=7)
    out = generate(model, prompts, params, torch.Generator().manual_seed(seed), lean=engine == "lean")
    return out.tokens, out.finished


def test_lean_engine_samples_the_tokens_megatron_samples():
    for seed in (0, 1, 2):
        lean = run_distributed(_sampled, world=1, args=("lean", seed))[0]
        mega = run_distributed(_sampled, world=1, args=("megatron", seed))[0]
        assert lean == mega
        assert any(len(t) > 1 for t in lean[0])


def _engine_at_tp2():
    from atesd_mc import engine

    eng = engine.resolve("auto", "lean", _build(2))
    return eng.decode, eng.forward, eng.describe()


def test_not_used_when_a_rank_holds_a_shard():
    for decode, forward, line in run_distributed(_engine_at_tp2, world=2, tp=2):
        assert decode == forward == "megatron"
        assert "tensor_model_parallel_size=2" in line, line


def _allow_list():
    """The whole model on one rank runs lean; a setting outside the allow-list sends it to
    megatron's layers, named in the engine's log line."""
    from atesd_mc import engine
    from atesd_mc.model.lean import unsupported
    from atesd_mc.model.qwen3 import unwrap

    inner = unwrap(_build(**ODD))
    out = {"plain": unsupported(inner), "auto": engine.resolve("auto", "auto", inner)}
    for name, value in (("softmax_scale", 0.5), ("window_size", (8, 0)), ("hidden_dropout", 0.1),
                        ("fp32_residual_connection", True)):
        saved = getattr(inner.config, name)
        setattr(inner.config, name, value)
        out[name] = (unsupported(inner), engine.resolve("auto", "lean", inner))
        setattr(inner.config, name, saved)
    return out


def test_allow_list_sends_unknown_settings_to_megatron():
    out = run_distributed(_allow_list, world=1)[0]
    assert out["plain"] is None
    assert out["auto"].decode == "lean" and out["auto"].forward == "lean"  # CPU: auto is lean
    for name in ("softmax_scale", "window_size", "hidden_dropout", "fp32_residual_connection"):
        reason, eng = out[name]
        assert reason is not None and reason.startswith(name + "="), (name, reason)
        assert eng.decode == eng.forward == "megatron" and name in eng.describe(), (name, eng)


def _records(cfg, n):
    from test_trainer import _run_steps

    return [(r["loss"], r["alpha"], r["probe_nll"], r["teacher_score"], r["rollout_len"])
            for r in _run_steps(cfg, n)]


def test_training_steps_match_megatron_engine(tmp_path):
    """Warm start, rollouts, teacher forward, student forward + backward, probe NLL and teacher
    score through the lean path: the same records as megatron's layers over 3 ATESD steps after a
    30-step warm start trained each way (same rollouts, losses within 1e-5)."""
    from test_trainer import _cfg

    # lr 1e-4, not the usual 1e-3: Adam turns a gradient element of ~1e-8 (about its eps) into a
    # step of about +-lr, so float rounding that differs between the engines there becomes an
    # lr-sized weight difference after the first update; what this test compares is the engines'
    # arithmetic, not that amplification.
    cfg = _cfg(tmp_path, warm_start_iters=30, warm_start_lr=3e-3, lr=1e-4)
    cfg.train.train_engine = "lean"
    lean = run_distributed(_records, world=1, args=(cfg, 3))[0]
    cfg.generation.inference_engine = cfg.train.train_engine = "megatron"
    mega = run_distributed(_records, world=1, args=(cfg, 3))[0]
    caches = [p for p in (tmp_path / "cache").glob("warm_start-*") if p.suffix != ".lock"]
    assert len(caches) == 2  # one warm start per engine: the cache key names it
    assert any(r[0] > 1e-6 for r in lean)
    for a, b in zip(lean, mega):
        assert a[1] == b[1] and a[4] == b[4]  # alpha, rollout length: identical samples
        for x, y in zip(a[0:1] + a[2:4], b[0:1] + b[2:4]):
            assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (a, b)


def _side(seed, lengths, width_extra=2):
    """Right-padded random rows of the given real lengths (odd, unequal) and their response positions."""
    from atesd_mc.batching import build_side

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n - n // 2,), generator=g).tolist() for n in lengths]
    responses = [torch.randint(1, VOCAB, (n // 2,), generator=g).tolist() for n in lengths]
    side, _ = build_side(prompts, responses, "cpu")
    return side


def _grads(lora, world_rank_rows):
    """Loss and every trainable gradient (DDP main_grad, averaged over data-parallel ranks) of one
    megatron schedule step with megatron's layers, then with the packed lean path."""
    import torch.distributed as dist

    from atesd_mc import schedule
    from atesd_mc.config import ParallelConfig
    from atesd_mc.model.qwen3 import output_weight
    from atesd_mc.optim import wrap_ddp

    if lora:
        model = _lora_model()
        _fill_b(model)
    else:
        model = _build(untie_embeddings_and_output_weights=True, **ODD)
    ddp = wrap_ddp(model, ParallelConfig())
    rank = dist.get_rank()
    sides = [_side(10 * rank + j, lens) for j, lens in enumerate(world_rank_rows[rank])]
    w = output_weight(model)

    def loss_fn(h, i):  # any function of the logits: the output layer's gradient is checked too
        loss = (h @ w.t()).log_softmax(-1)[:, 1::7].sum()
        return loss, {"loss": loss.detach()}

    out = {}
    for lean in (False, True):
        ddp.zero_grad_buffer()
        infos = schedule.run(ddp, sides, loss_fn, forward_only=False, lean=lean)
        ddp.finish_grad_sync()
        grads = {n: p.main_grad.clone() for n, p in ddp.module.named_parameters() if p.requires_grad}
        out[lean] = (sum(float(i["loss"]) for i in infos), grads)
    return out


def test_packed_training_pass_equals_megatron_gradients():
    """Padding-free lean forward + backward through megatron's schedule and DDP (2 data-parallel
    ranks, 2 micro-batches of unequal odd-length rows): the same loss and the same averaged
    gradient of every trainable parameter as megatron's layers, with and without LoRA."""
    rows = [[(23, 5, 17), (9, 30)], [(11,), (3, 4, 29, 8)]]
    for lora in (False, True):
        for rank_out in run_distributed(_grads, world=2, args=(lora, rows)):
            (l_mega, g_mega), (l_lean, g_lean) = rank_out[False], rank_out[True]
            assert abs(l_mega - l_lean) <= 1e-5 * max(1.0, abs(l_mega))
            assert g_mega.keys() == g_lean.keys() and len(g_mega) > 0
            for name, ref in g_mega.items():
                scale = ref.abs().max().item()
                assert scale > 0, name  # every trainable parameter receives gradient
                assert (g_lean[name] - ref).abs().max().item() <= 1e-5 * max(scale, 1e-3), name
