"""FLOP accounting (atesd_mc.flops): a hand count on a small config, the real Qwen3 sizes, and the
real megatron model measured by torch's FlopCounterMode.

What FlopCounterMode sees on the local (non-TE) spec: aten mm/addmm for every linear (megatron's
own autograd function calls matmul forward and two matmuls backward), baddbmm + bmm for attention
(DotProductAttention computes the whole s x s score matrix and masks it), mm/addmm inside the fused
divergence (except its in-place addmm_, which FlopCounterMode silently counts as 0: a small dispatch
mode counts it beside it). It does not count norms, softmax, RoPE or the embedding lookup/backward,
and neither do we, so the comparison is like for like: full s² attention is what runs, and the test
checks that the causal-half count would NOT match."""
import dataclasses
import os

import pytest
import torch

from harness import run_distributed

from atesd_mc import flops
from atesd_mc.config import ModelConfig, ParallelConfig
from atesd_mc.config_io import parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------
# Hand count. L=2, h=8, ffn=12, 2 query heads, 1 kv head, head_dim 4, V=10.
SMALL = ModelConfig(num_layers=2, hidden_size=8, ffn_hidden_size=12, num_attention_heads=2,
                    num_query_groups=1, kv_channels=4, seq_length=16)


def test_forward_by_hand():
    # per token per layer: qkv 2*8*(2*4 + 2*1*4) = 256; o 2*(2*4)*8 = 128; mlp 3*2*8*12 = 576 -> 960
    assert flops.linear_flops_per_token(SMALL) == 960
    # attention per layer: 4 * heads(2) * head_dim(4) * s^2 = 32 s^2 -> s=3: 288, s=5: 800
    assert flops.attention_flops(SMALL, 3) == 288 and flops.attention_flops(SMALL, 5) == 800
    # sequences [3, 5]: 2 layers * (8 tokens * 960 + 288 + 800) = 17536; logits 2*8*10*8 = 1280
    assert flops.forward_flops(SMALL, 10, [3, 5]) == 17536 + 1280
    assert flops.train_flops(SMALL, 10, [3, 5]) == 3 * 18816
    # causal: pairs 3*4/2 = 6 and 5*6/2 = 15 -> 32 * 21 = 672 per layer; 2*(7680 + 672) + 1280
    assert flops.forward_flops(SMALL, 10, [3, 5], causal=True) == 17984
    # body only (forward_hidden): no output layer
    assert flops.forward_flops(SMALL, 10, [3, 5], logit_tokens=0) == 17536
    # padding is not counted: [3, 5] is less than what a padded [2, 5] batch executes
    assert flops.forward_flops(SMALL, 10, [5, 5]) == 2 * (10 * 960 + 1600) + 2 * 8 * 10 * 10


def test_lora_by_hand():
    cfg = dataclasses.replace(SMALL, lora_rank=2)
    # 2*r*(in+out): q 4*16=64, k 4*12=48, v 48, o 64, gate 4*20=80, up 80, down 80 -> 464
    assert flops.lora_flops_per_token(cfg) == 464
    assert flops.forward_flops(cfg, 10, [3]) == 2 * (3 * (960 + 464) + 288) + 2 * 8 * 10 * 3
    assert flops.forward_flops(cfg, 10, [3], lora=False) == flops.forward_flops(SMALL, 10, [3])
    # LoRA backward: base dX (960) + adapters 2x (928) per token, attention 2x; layer 1 skips the
    # base qkv dX 2*8*16 = 256 and the q/k/v adapters' input grads 3 * 2*2*8 = 96 per token
    want = 2 * (3 * (960 + 928) + 2 * 288) - 3 * (256 + 96) + 2 * 8 * 10 * 3
    assert flops.backward_flops(cfg, 10, [3]) == want
    assert flops.backward_flops(cfg, 10, [3], trainable="full") == 2 * flops.forward_flops(cfg, 10, [3])
    # params: A [r, in] + B [out, r] per target, per layer: 2*(16+12+12+16+20+20+20) = 232; x2 layers
    assert flops.lora_param_count(cfg) == 464


def test_decode_by_hand():
    # prompt 3, 4 new tokens: prefill 2*(3*960 + 32*9) + logits at 1 position 2*8*10 = 6496;
    # steps j=1..3 feed one token each: 3 * (2*960 + 160) = 6240, attending 4, 5, 6 keys:
    # 2 layers * 32 * (4+5+6) = 960
    assert flops.decode_flops(SMALL, 10, [3], [4]) == 6496 + 6240 + 960
    # with a causal prefill the KV cache saves exactly the recomputation: a causal forward over the
    # p + n - 1 fed tokens with logits at the n sampled positions
    for p, n in [(3, 4), (7, 1), (1, 9)]:
        assert flops.decode_flops(SMALL, 10, [p], [n], causal=True) == pytest.approx(
            flops.forward_flops(SMALL, 10, [p + n - 1], logit_tokens=n, causal=True))
    assert flops.decode_flops(SMALL, 10, [3, 5], [4, 0]) == flops.decode_flops(SMALL, 10, [3], [4])


def test_step_and_loss_by_hand():
    # fused loss on 6 tokens, h=8, V=10: 3 matmuls (student, teacher logits, grad hidden) + weight grad
    assert flops.fused_loss_flops(SMALL, 10, 6, weight_grad=True) == 4 * 2 * 8 * 10 * 6
    assert flops.fused_loss_flops(SMALL, 10, 6, weight_grad=False) == 3 * 2 * 8 * 10 * 6
    s = flops.step_flops(SMALL, 10, [3, 3], [2, 2], [5, 5], padded_vocab=16)
    assert s["rollout"] == flops.decode_flops(SMALL, 16, [3, 3], [2, 2])
    assert s["teacher"] == flops.forward_flops(SMALL, 0, [7, 7], logit_tokens=0)
    assert s["student"] == 3 * flops.forward_flops(SMALL, 0, [5, 5], logit_tokens=0) + 4 * 2 * 8 * 10 * 4


def test_bandwidth_and_mfu():
    # params: emb 10*8 + 2 layers*(qkv 8*16 + o 8*8 + mlp 3*8*12 + norms 2*8 + qk-norms 2*4)
    # + final norm 8 = 80 + 2*(128 + 64 + 288 + 16 + 8) + 8 = 80 + 1008 + 8
    assert flops.param_count(SMALL, 10) == 1096
    # tied: every weight is read (the embedding is the output layer); KV: batch 2 * 2 layers *
    # (k, v) 2 * 1 group * 4 * ctx 6 = 192 values; bf16: (1096 + 192) * 2 bytes
    assert flops.decode_step_bytes(SMALL, 10, 2, 6, 2) == 2576
    assert flops.decode_bandwidth_bound(SMALL, 10, 2, 6, 2, 1000.0) == pytest.approx(2.576)
    untied = dataclasses.replace(SMALL, untie_embeddings_and_output_weights=True)
    assert flops.decode_step_bytes(untied, 10, 2, 6, 2) == 2576  # + output layer - embedding table
    assert flops.mfu(989e12, 1.0, "NVIDIA H100 80GB HBM3") == pytest.approx(1.0)
    assert flops.mfu(756e12, 2.0, "NVIDIA H100 PCIe", n_gpus=2) == pytest.approx(0.25)
    assert flops.mfu(1e12, 1.0, "NVIDIA H200") == pytest.approx(1 / 989)
    assert flops.mfu(1e12, 1.0, "cpu") is None and flops.mfu(1e12, 1.0, None) is None
    assert flops.hbm_bandwidth("NVIDIA H200") == 4.8e12 and flops.hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12


@pytest.mark.parametrize("name,total,non_embedding", [
    ("qwen3_1p7b", 1.72e9, 1.41e9), ("qwen3_4b", 4.02e9, 3.63e9), ("qwen3_8b", 8.19e9, 6.95e9)])
def test_real_qwen3_sizes(name, total, non_embedding):
    """Parameter counts of the example presets match Qwen3's published sizes (1.7B, 4B, 8B)."""
    cfg = parse_config(["--config", os.path.join(REPO, "examples", f"{name}.yaml")]).model
    n = flops.param_count(cfg, cfg.vocab_size, lora=False)
    emb = cfg.vocab_size * cfg.hidden_size * (2 if cfg.untie_embeddings_and_output_weights else 1)
    assert n == pytest.approx(total, rel=0.01) and n - emb == pytest.approx(non_embedding, rel=0.01)
    # a forward token costs about 2 x the params it multiplies (all but the input-embedding table,
    # which is also the output layer when tied): the usual 2N sanity check
    multiplied = n - emb / 2 if cfg.untie_embeddings_and_output_weights else n
    assert flops.forward_flops(cfg, cfg.vocab_size, [1], lora=False) == pytest.approx(2 * multiplied, rel=0.01)


# ----------------------------------------------------------------------------------------------
# The real model under FlopCounterMode (world 1, gloo).
VOCAB = 300  # pads to 384: generation logits use the padded vocab, the fused loss the real one
MODEL = dict(num_layers=2, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4, num_query_groups=2,
             kv_channels=24, seq_length=64)


def _inplace_addmm_mode():
    """FlopCounterMode has no formula for the in-place aten.addmm_ (it counts 0), and the fused
    divergence accumulates the output-weight gradient with it: count that op here, 2*m*n*k."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class InplaceAddmm(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.addmm_.default:
                (m, k), n = args[1].shape, args[2].shape[1]
                self.flops += 2 * m * n * k
            return func(*args, **(kwargs or {}))

    return InplaceAddmm()


def _counted(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, _inplace_addmm_mode() as inplace:
        fn()
    ops = {str(k).split(".")[-1]: int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    if inplace.flops:
        ops["addmm_"] = inplace.flops
    return counter.get_total_flops() + inplace.flops, ops


def _measure():
    from atesd_mc import distributed, schedule
    from atesd_mc.batching import build_side, per_sequence_weights
    from atesd_mc.config import LossConfig
    from atesd_mc.generation import SamplingParams, generate
    from atesd_mc.losses import distill_loss
    from atesd_mc.model.lora import add_lora, lora_disabled
    from atesd_mc.model.qwen3 import build_stage, local_vocab_range, output_weight, tp_input

    distributed.model_parallel_seed(1234)
    cfg = ModelConfig(**MODEL)
    model = build_stage(cfg, ParallelConfig(), VOCAB)
    g = torch.Generator().manual_seed(0)
    out = {}

    # (a) full model forward (logits over the padded vocab), then backward
    tokens = torch.randint(1, VOCAB, (3, 20), generator=g)
    pos = torch.arange(20).expand(3, -1)

    def fwd_bwd():
        model(tokens, pos, None).float().square().mean().backward()

    out["forward"] = _counted(lambda: model(tokens, pos, None))
    out["train"] = _counted(fwd_bwd)
    model.zero_grad(set_to_none=True)

    # (b) KV-cache generation, greedy, equal prompt lengths
    prompts = torch.randint(1, VOCAB, (3, 7), generator=g).tolist()
    params = SamplingParams(max_new_tokens=5, temperature=0)
    out["decode"] = _counted(lambda: generate(model, prompts, params, torch.Generator().manual_seed(0)))

    # (c) the trainer's student and teacher stages: full fine-tuning, then LoRA (teacher = LoRA off)
    loss_cfg = LossConfig()
    rollouts = torch.randint(1, VOCAB, (3, 6), generator=g).tolist()
    teacher_ctx = torch.randint(1, VOCAB, (3, 11), generator=g).tolist()
    student_side, ids = build_side(prompts, rollouts, torch.device("cpu"))
    teacher_side, _ = build_side(teacher_ctx, rollouts, torch.device("cpu"))
    weights = per_sequence_weights(torch.tensor([6, 6, 6]), 3)

    def stages(teacher_ctx_manager):
        with teacher_ctx_manager(), torch.no_grad():
            t_counted = _counted(lambda: schedule.run(model, [teacher_side], lambda h, i: (
                h.sum() * 0, {"h": h.detach()}), forward_only=True))
            h_t = schedule.run(model, [teacher_side], lambda h, i: (h.sum() * 0, {"h": h.detach()}),
                               forward_only=True)[0]["h"]
        w_s = output_weight(model)
        _, _, valid = local_vocab_range(model, 0, 1)

        def loss_fn(h, i):
            loss = distill_loss(tp_input(h), h_t, w_s, None, valid, weights, loss_cfg, ids)
            return loss, {"loss": loss.detach()}

        s_counted = _counted(lambda: schedule.run(model, [student_side], loss_fn, forward_only=False))
        model.zero_grad(set_to_none=True)
        return t_counted, s_counted

    import contextlib

    out["full_teacher"], out["full_student"] = stages(contextlib.nullcontext)
    add_lora(model, 4, 8.0, ["q", "k", "v", "o", "gate", "up", "down"], seed=1)
    out["lora_teacher"], out["lora_student"] = stages(lambda: lora_disabled(model))
    out["lora_decode"] = _counted(lambda: generate(model, prompts, params, torch.Generator().manual_seed(0)))
    return out


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure, world=1)[0]


def _close(counted, predicted, ops, rel=0.05):
    print(f"FlopCounterMode {counted:.6g} predicted {predicted:.6g} ratio {counted / predicted:.6f} {ops}")
    assert counted == pytest.approx(predicted, rel=rel), f"counted {counted} predicted {predicted} ops {ops}"


def test_forward_backward_matches_flop_counter(measured):
    from atesd_mc.model.qwen3 import padded_vocab_size

    cfg = ModelConfig(**MODEL)
    vpad = padded_vocab_size(VOCAB, cfg.make_vocab_size_divisible_by, 1)
    fwd, fwd_ops = measured["forward"]
    train, train_ops = measured["train"]
    assert {"mm", "baddbmm", "bmm"} <= set(fwd_ops), fwd_ops  # linears + local attention
    _close(fwd, flops.forward_flops(cfg, vpad, [20] * 3), fwd_ops)
    _close(train, flops.train_flops(cfg, vpad, [20] * 3), train_ops)
    # honest about the attention convention: the local implementation computes the full s x s matrix
    full = flops.train_flops(cfg, vpad, [20] * 3)
    causal = flops.train_flops(cfg, vpad, [20] * 3, causal=True)
    assert abs(train - full) < abs(train - causal)
    assert abs(train - full) / full < 1e-3  # in practice exact


def test_decode_matches_flop_counter(measured):
    from atesd_mc.model.qwen3 import padded_vocab_size

    cfg = ModelConfig(**MODEL)
    vpad = padded_vocab_size(VOCAB, cfg.make_vocab_size_divisible_by, 1)
    _close(*measured["decode"][:1], flops.decode_flops(cfg, vpad, [7] * 3, [5] * 3), measured["decode"][1])
    lcfg = dataclasses.replace(cfg, lora_rank=4)
    _close(*measured["lora_decode"][:1], flops.decode_flops(lcfg, vpad, [7] * 3, [5] * 3),
           measured["lora_decode"][1])


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_step_stages_match_flop_counter(measured, kind):
    """step_flops' teacher and student entries = what the trainer's stage code executes."""
    from atesd_mc.model.qwen3 import padded_vocab_size

    cfg = ModelConfig(**MODEL, lora_rank=4 if kind == "lora" else 0)
    vpad = padded_vocab_size(VOCAB, cfg.make_vocab_size_divisible_by, 1)
    want = flops.step_flops(cfg, VOCAB, [7] * 3, [6] * 3, [11] * 3, padded_vocab=vpad)
    teacher, t_ops = measured[f"{kind}_teacher"]
    student, s_ops = measured[f"{kind}_student"]
    _close(teacher, want["teacher"], t_ops)
    _close(student, want["student"], s_ops)
