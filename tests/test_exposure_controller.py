"""AdaptiveController: decisions, rewards through observe, REINFORCE, edge cases, save/load."""
import io
import math

import pytest
import torch

from atesd_mc.config import ControllerConfig, ExposureConfig
from atesd_mc.exposure import AdaptiveController


def _controller(seed=0, total=100, variant=None, exposure=None, **cfg):
    return AdaptiveController(ControllerConfig(**cfg), exposure or ExposureConfig(), total, seed,
                              reward_variant=variant)


def _params_finite(c):
    return all(torch.isfinite(p).all() for p in c.policy.parameters())


def test_hold_windows_and_idempotent_alpha():
    c = _controller(hold_steps=5)
    alphas = [c.alpha_for_step(t) for t in range(12)]
    assert c.alpha_for_step(11) == alphas[11]  # asking twice does not resample
    assert len(set(alphas[0:5])) == 1 and len(set(alphas[5:10])) == 1 and alphas[10] == alphas[11]
    assert alphas[0] != alphas[5] != alphas[10]
    assert c.counters["decisions"] == 3
    assert all(0.05 <= a <= 1.0 for a in alphas)


def test_rewards_through_observe_by_hand():
    # H = L = 3, B = 2, gamma = 0.5, lambda_gt = 0.2, batch z-scoring: two decisions (t0 = 0, 3)
    c = _controller(hold_steps=3, lookahead_steps=3, decisions_per_update=2, reward_gamma=0.5,
                    reward_lambda_gt=0.2)
    probe = [2.0, 1.5, 1.7, 1.0, 1.0, 0.5, 0.25]  # l_0 .. l_6 (l_0 from observe(-1))
    score = [None, -1.0, -0.5, -0.2, -0.2, -0.2, -0.2]  # g_1 .. g_6
    c.observe(-1, probe_nll=probe[0])
    for t in range(6):
        c.alpha_for_step(t)
        info = c.observe(t, loss=0.1, mismatch=0.1, probe_nll=probe[t + 1], confidence=0.5,
                         teacher_score=score[t + 1])
        if t == 2:
            assert [d["t0"] for d in info["completed"]] == [0] and not info["updated"]
            assert info["completed"][0]["progress"] == pytest.approx(0.675)
            assert info["completed"][0]["g_gt"] == pytest.approx(-1.3 / 1.75)
    # decision 3: G_lp = 0 + 0.5*0.5 + 0.25*0.25 = 0.3125, G_gt = -0.2; z = -1 (first), +1
    assert info["updated"] and [d["t0"] for d in info["completed"]] == [3]
    assert info["rewards"] == [pytest.approx(0.675 - 0.2), pytest.approx(0.3125 + 0.2)]
    # population std of two values: advantages are -1, +1 (up to eps / std)
    assert info["advantages"] == [pytest.approx(-1.0, abs=1e-6), pytest.approx(1.0, abs=1e-6)]


def test_one_step_variant_scores_after_one_update():
    c = _controller(hold_steps=2, lookahead_steps=10, decisions_per_update=2, variant="one_step")
    c.observe(-1, probe_nll=3.0)
    c.alpha_for_step(0)
    info = c.observe(0, probe_nll=2.5)
    assert info["completed"][0]["progress"] == pytest.approx(0.5)


def test_reinforce_moves_policy_mean_toward_better_alpha():
    # bandit: each update lowers the probe NLL by 1 - 4(alpha - 0.85)^2, so the one-step
    # learning progress (H = L = 1) is highest at alpha = 0.85
    c = _controller(seed=0, total=400, variant="lp_only", hold_steps=1, lookahead_steps=1,
                    decisions_per_update=8, controller_lr=0.01)
    nll, alphas = 100.0, []
    c.observe(-1, probe_nll=nll)
    for t in range(400):
        alphas.append(c.alpha_for_step(t))
        nll -= 1.0 - 4 * (alphas[-1] - 0.85) ** 2
        c.observe(t, loss=1.0, mismatch=0.1, probe_nll=nll, confidence=0.5)
    assert c.counters["updates"] == 50
    assert c.policy_summary()[2] > 0.8
    assert abs(sum(alphas[-100:]) / 100 - 0.85) < 0.06
    assert _params_finite(c)


def _drive(c, steps, start=0, nan_every=7):
    """Deterministic synthetic trainer statistics with feedback from alpha and some NaNs."""
    alphas, infos = [], []
    for t in range(start, start + steps):
        a = c.alpha_for_step(t)
        bad = t % nan_every == 3
        infos.append(c.observe(
            t, loss=math.nan if bad else 1.0 / (1 + t) + a, mismatch=a * a,
            probe_nll=math.nan if bad else 3.0 - 0.05 * t * a + 0.01 * (t % 3),
            confidence=0.5 + 0.01 * t, teacher_score=-(1 - a) + 0.02 * (t % 5)))
        alphas.append(a)
    return alphas, infos


RT_CFG = dict(hold_steps=2, lookahead_steps=3, decisions_per_update=2, controller_lr=0.05)


@pytest.mark.parametrize("via_torch_save", [False, True])
def test_save_load_round_trip_is_bit_identical(via_torch_save):
    ref = _controller(seed=3, total=40, **RT_CFG)
    ref_alphas, _ = _drive(ref, 40)
    first = _controller(seed=3, total=40, **RT_CFG)
    alphas, _ = _drive(first, 20)
    assert first.open and first.pending  # mid-run: an open and a scored-but-unused decision
    sd = first.state_dict()
    if via_torch_save:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    resumed = _controller(seed=99, total=40, **RT_CFG)  # different seed: all must come from sd
    resumed.load_state_dict(sd)
    more, _ = _drive(resumed, 20, start=20)
    assert alphas + more == ref_alphas
    assert ref.counters == resumed.counters and ref.counters["updates"] >= 5
    for p, q in zip(ref.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(p, q)
    for s1, s2 in zip(ref.optimizer.state.values(), resumed.optimizer.state.values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert torch.equal(ref.generator.get_state(), resumed.generator.get_state())


def test_state_dict_is_a_snapshot():
    c = _controller(**RT_CFG)
    _drive(c, 10)
    sd = c.state_dict()
    saved = {k: v.clone() for k, v in sd["policy"].items()}
    _drive(c, 10, start=10)
    assert all(torch.equal(saved[k], sd["policy"][k]) for k in saved)


def test_zero_reward_variance_gives_zero_advantages_and_no_nan():
    c = _controller(hold_steps=1, lookahead_steps=2, decisions_per_update=4)
    before = [p.detach().clone() for p in c.policy.parameters()]
    for t in range(20):
        c.alpha_for_step(t)
        info = c.observe(t, loss=1.0, mismatch=0.1, probe_nll=2.0, confidence=0.5,
                         teacher_score=-1.0)
        if "advantages" in info:
            assert info["advantages"] == [0.0] * 4 and info["policy_loss"] == 0.0
    assert c.counters["updates"] >= 4 and _params_finite(c)
    # zero advantages and no entropy excess: nothing should move
    assert all(torch.equal(p, q) for p, q in zip(before, c.policy.parameters()))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None])
def test_non_finite_signals_drop_decisions_without_nan(bad):
    c = _controller(hold_steps=1, lookahead_steps=2, decisions_per_update=2)
    for t in range(15):
        a = c.alpha_for_step(t)
        info = c.observe(t, loss=bad, mismatch=bad, probe_nll=bad, confidence=bad,
                         teacher_score=bad)
        assert math.isfinite(a) and math.isfinite(info["policy_mean"])
    assert c.counters["updates"] == 0 and c.counters["dropped"] == 14  # t0 = 0..13 complete
    assert all(math.isfinite(x) for x in c.features.state(15)) and _params_finite(c)


def test_alpha_at_bounds_stays_finite():
    # policy mass far above alpha_max: every alpha is clipped, log-prob uses the raw sample
    ex = ExposureConfig(alpha_min=0.0, alpha_max=0.3)
    c = _controller(exposure=ex, hold_steps=1, lookahead_steps=1, decisions_per_update=4,
                    controller_init_mean=0.95, controller_init_concentration=40.0,
                    controller_lr=0.1)
    nll = 5.0
    c.observe(-1, probe_nll=nll)
    for t in range(60):
        a = c.alpha_for_step(t)
        assert a == 0.3 and c.last_decision["alpha_raw"] > 0.3
        nll -= 0.01 * (t % 3)
        c.observe(t, loss=1.0, mismatch=0.2, probe_nll=nll, confidence=0.9, teacher_score=-1)
    assert c.counters["updates"] == 15 and c.counters["skipped_updates"] == 0
    assert _params_finite(c) and all(math.isfinite(x) for x in c.policy_summary())


def test_non_finite_loss_skips_update():
    c = _controller(hold_steps=1, lookahead_steps=1, decisions_per_update=2)
    c.observe(-1, probe_nll=1.0)
    c.alpha_for_step(0)
    c.observe(0, probe_nll=0.5)
    c.alpha_for_step(1)
    c.pending[0]["alpha_raw"] = 0.0  # log(0) = -inf in the policy gradient
    before = [p.detach().clone() for p in c.policy.parameters()]
    info = c.observe(1, probe_nll=0.0)
    assert info["updated"] is False and c.counters["skipped_updates"] == 1
    assert all(torch.equal(p, q) for p, q in zip(before, c.policy.parameters()))


def test_observe_rejects_non_increasing_steps():
    c = _controller()
    c.observe(0, probe_nll=1.0)
    with pytest.raises(ValueError):
        c.observe(0, probe_nll=1.0)


def test_policy_summary_initial():
    a, b, mean, q10, q90 = _controller().policy_summary()
    assert (a, b) == (pytest.approx(2.4), pytest.approx(1.6)) and mean == pytest.approx(0.6)
    assert 0 < q10 < mean < q90 < 1
    assert _controller().policy_summary(torch.ones(6, dtype=torch.float64))[2] == pytest.approx(0.6)


def test_entropy_target_default_is_beta_2_2():
    expected = torch.distributions.Beta(torch.tensor(2.0, dtype=torch.float64),
                                        torch.tensor(2.0, dtype=torch.float64)).entropy().item()
    assert _controller().entropy_target == pytest.approx(expected, abs=1e-14)
    assert _controller(entropy_target=-1.0).entropy_target == -1.0
