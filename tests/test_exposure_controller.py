"""AdaptiveController: decisions, rewards through observe, REINFORCE, edge cases, save/load."""
import io
import math

import pytest
import torch

from atesd_mc.config import ControllerConfig, ExposureConfig
from atesd_mc.exposure import AdaptiveController
from atesd_mc.exposure.reward import advantages


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


def _falling_loss_run(baseline, updates=10, seed=0):
    """lp_only controller on a probe NLL whose per-update drop shrinks linearly with time
    (l_t = 10 - 0.02 t + 4e-5 t^2) plus small noise: a decision's learning progress mostly
    says *when* it was made. Returns the (decision step, advantage) of every update."""
    c = _controller(seed=seed, total=200, variant="lp_only", hold_steps=3, lookahead_steps=4,
                    decisions_per_update=4, advantage_baseline=baseline)
    noise = torch.Generator().manual_seed(seed + 1)
    steps, adv, t = [], [], -1
    c.observe(-1, probe_nll=10.0)
    while c.counters["updates"] < updates:
        t += 1
        c.alpha_for_step(t)
        eps = 5e-4 * torch.randn((), generator=noise, dtype=torch.float64).item()
        info = c.observe(t, loss=1.0, mismatch=0.1, confidence=0.5,
                         probe_nll=10.0 - 0.02 * (t + 1) + 4e-5 * (t + 1) ** 2 + eps)
        if "advantages" in info:
            assert len(info["decision_steps"]) == len(info["advantages"]) == 4
            assert info["decision_steps"] == sorted(info["decision_steps"])
            steps += info["decision_steps"]
            adv += info["advantages"]
    return steps, adv


def _within_update_corr(steps, adv, b=4):
    """Mean over updates of corr(advantage, decision step) inside the update: the pooled
    correlation over a run says little, as every update's advantages have mean 0."""
    x = torch.tensor(steps, dtype=torch.float64).view(-1, b)
    y = torch.tensor(adv, dtype=torch.float64).view(-1, b)
    return torch.stack([torch.corrcoef(torch.stack([u, v]))[0, 1] for u, v in zip(x, y)]).mean().item()


def test_detrended_advantage_is_less_correlated_with_decision_time():
    steps_b, adv_b = _falling_loss_run("batch")
    steps_d, adv_d = _falling_loss_run("detrended")
    assert steps_b == steps_d and len(steps_b) == 40  # same decisions, 10 updates of B = 4
    assert steps_b[:4] == [0, 3, 6, 9]  # decision_steps are the decisions' first steps
    corr_b, corr_d = _within_update_corr(steps_b, adv_b), _within_update_corr(steps_d, adv_d)
    assert corr_b < -0.5  # batch z-scores rank decisions by how early they were made
    assert abs(corr_d) < 0.5 * abs(corr_b)


def test_batch_baseline_is_the_default_and_unchanged():
    assert _controller().baseline == "batch" and ControllerConfig().advantage_baseline == "batch"
    with pytest.raises(ValueError, match="advantage_baseline"):
        ControllerConfig(advantage_baseline="progress")
    # batch advantages are exactly the z-scores of the rewards of their update
    _, infos = _drive(_controller(**RT_CFG), 20)
    ups = [i for i in infos if "advantages" in i]
    assert ups and all(i["advantages"] == advantages(i["rewards"]) for i in ups)


def test_state_dict_round_trip_keeps_the_reward_history():
    cfg = dict(RT_CFG, advantage_baseline="detrended")
    ref = _controller(seed=3, total=40, **cfg)
    _, ref_infos = _drive(ref, 40)
    first = _controller(seed=3, total=40, **cfg)
    _, infos = _drive(first, 20)
    sd = first.state_dict()
    assert len(sd["history"]["t0"]) == len(sd["history"]["reward"]) >= 6
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    resumed = _controller(seed=99, total=40, **cfg)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.history == first.history
    _, more = _drive(resumed, 20, start=20)
    adv = lambda xs: [i["advantages"] for i in xs if "advantages" in i]  # noqa: E731
    assert adv(infos + more) == adv(ref_infos) and resumed.history == ref.history
    # a state saved before the history existed loads with an empty one
    old = first.state_dict()
    del old["history"]
    fresh = _controller(seed=3, total=40, **cfg)
    fresh.load_state_dict(old)
    assert fresh.history == {"t0": [], "reward": []}


def test_update_fields_reach_the_step_record():
    """steps.observe_controller -> StepStats.record (the metrics.jsonl line): every REINFORCE
    update's rewards, advantages and decision steps are in it, as JSON."""
    import json
    import types

    from atesd_mc.stages import Update
    from atesd_mc.steps import RolloutStats, StepStats, observe_controller

    rt = types.SimpleNamespace(cfg=types.SimpleNamespace(controller=ControllerConfig(**RT_CFG)))
    c = _controller(**RT_CFG, advantage_baseline="detrended")
    records = []
    for t in range(12):
        a = c.alpha_for_step(t)
        rollout = RolloutStats(mismatch=0.1, top1_disagree=0.1, confidence=0.5, rollout_len=9.0,
                               eos_rate=1.0)
        fields = observe_controller(rt, c, t, a, Update(applied=True, grad_norm=1.0), 1.0,
                                    rollout, 3.0 - 0.1 * t + 0.01 * (t % 3), -1.0 + 0.01 * t)
        stats = StepStats(step=t + 1, alpha=a, loss=1.0, tokens={}, probe_nll=0.0, lr=1e-3,
                          update=Update(applied=True, grad_norm=1.0), controller=fields)
        records.append(json.loads(json.dumps(stats.record(0))))
    ups = [r for r in records if "advantages" in r]
    assert len(ups) == c.counters["updates"] >= 2
    for r in ups:
        assert len(r["rewards"]) == len(r["advantages"]) == len(r["decision_steps"]) == 2
        assert r["reward"] == pytest.approx(sum(r["rewards"]) / 2)
    assert [s for r in ups for s in r["decision_steps"]] == c.history["t0"]


def test_two_updates_in_one_observe_log_every_decision():
    # a skipped (unobserved) step 2 lets decisions 0 and 1 complete together at step 3
    c = _controller(hold_steps=1, lookahead_steps=3, decisions_per_update=1)
    c.observe(-1, probe_nll=5.0)
    for t in range(4):
        c.alpha_for_step(t)
        if t != 2:
            info = c.observe(t, probe_nll=4.0 - 0.5 * t)
    assert c.counters["updates"] == 2
    assert info["decision_steps"] == [0, 1] and len(info["rewards"]) == len(info["advantages"]) == 2
