"""Baseline losses on hand-computed examples; SFT loss equals cross-entropy on reference tokens."""
import math

import torch

from harness import run_distributed

from atesd_mc.losses import grpo_advantages, grpo_loss


def test_grpo_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    adv = grpo_advantages(r, 4, eps=0.0 + 1e-12)
    # group 1: mean 0.5, population std 0.5 -> +1 / -1; group 2: all equal -> 0
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -1.0, 1.0, 0, 0, 0, 0], dtype=torch.float64))


def test_grpo_loss_by_hand():
    lp_new = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    lp_old = torch.tensor([-1.0, -1.0, -1.0])
    adv = torch.tensor([1.0, 1.0, -1.0])
    w = torch.tensor([0.5, 0.25, 0.25])
    loss = grpo_loss(lp_new, lp_old, adv, w, clip_eps=0.2)
    # ratios 1, e^-1 (0.3679; clip would give 0.8 but min(0.3679, 0.8)=0.3679), e^0.5 (1.6487;
    # A<0: min(-1.6487, -1.2) = -1.6487)
    want = -(0.5 * 1.0 + 0.25 * math.exp(-1) + 0.25 * -math.exp(0.5))
    assert abs(loss.item() - want) < 1e-6
    loss.backward()
    # d/dlp of -w*ratio*A = -w*A*ratio for the unclipped terms
    want_grad = torch.tensor([-0.5, -0.25 * math.exp(-1), 0.25 * math.exp(0.5)])
    assert torch.allclose(lp_new.grad, want_grad, atol=1e-6)


def _sft_vs_ce(tp):
    from atesd_mc.losses import sft_loss
    from megatron.core import parallel_state as ps

    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 16, generator=g, dtype=torch.float64)
    w_full = torch.randn(40, 16, generator=g, dtype=torch.float64)  # 37 real + 3 padding rows
    ids = torch.randint(0, 37, (7,), generator=g)
    r = ps.get_tensor_model_parallel_rank()
    w = w_full.chunk(tp)[r]
    valid = max(0, min(w.shape[0], 37 - r * w.shape[0]))
    ours = sft_loss(h, w, valid, ids, torch.ones(7, dtype=torch.float64))
    ref = torch.nn.functional.cross_entropy(h @ w_full[:37].t(), ids, reduction="sum")
    return ours.item(), ref.item()


def test_sft_loss_is_cross_entropy_on_reference_tokens():
    # megatron's vocab-parallel cross-entropy computes in float32: fp32 tolerance vs a float64 oracle
    for tp, world in ((1, 1), (2, 2)):
        for ours, ref in run_distributed(_sft_vs_ce, world=world, tp=tp, args=(tp,)):
            assert abs(ours - ref) <= 1e-6 * abs(ref)
