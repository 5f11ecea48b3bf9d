"""Beta policy maths against torch.distributions.Beta and scipy.stats.beta (float64)."""
import math

import pytest
import torch

from atesd_mc.exposure.beta_policy import (BetaPolicy, beta_cdf, beta_entropy, beta_icdf,
                                           beta_log_prob, softplus_inverse)


@pytest.fixture
def scipy_stats():
    # scipy is a test-only dependency: only the comparisons against it are skipped without it
    return pytest.importorskip("scipy.stats")


AB = [(1.0001, 1.0001), (2.4, 1.6), (2.0, 2.0), (1.2, 7.5), (30.0, 3.0), (150.0, 90.0)]
XS = [1e-6, 0.01, 0.2, 0.5, 0.77, 0.99, 1 - 1e-6]


def _t(v):
    return torch.tensor(v, dtype=torch.float64)


@pytest.mark.parametrize("a,b", AB)
def test_log_prob_and_entropy_match_torch_and_scipy(a, b, scipy_stats):
    x = _t(XS)
    ours = beta_log_prob(x, _t(a), _t(b))
    ref = torch.distributions.Beta(_t(a), _t(b)).log_prob(x)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    sp = torch.tensor(scipy_stats.beta.logpdf(XS, a, b), dtype=torch.float64)
    torch.testing.assert_close(ours, sp, rtol=1e-9, atol=1e-9)
    h = beta_entropy(_t(a), _t(b))
    torch.testing.assert_close(h, torch.distributions.Beta(_t(a), _t(b)).entropy(),
                               rtol=1e-10, atol=1e-10)
    assert abs(h.item() - float(scipy_stats.beta.entropy(a, b))) < 1e-9


def test_log_prob_gradients_match_torch_distribution():
    a, b = _t(2.4).requires_grad_(), _t(1.6).requires_grad_()
    beta_log_prob(_t(0.3), a, b).backward()
    a2, b2 = _t(2.4).requires_grad_(), _t(1.6).requires_grad_()
    torch.distributions.Beta(a2, b2).log_prob(_t(0.3)).backward()
    torch.testing.assert_close((a.grad, b.grad), (a2.grad, b2.grad), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("a,b", AB)
def test_cdf_and_icdf_match_scipy(a, b, scipy_stats):
    for x in XS:
        assert abs(beta_cdf(x, a, b) - scipy_stats.beta.cdf(x, a, b)) < 1e-11
    for u in (1e-6, 0.1, 0.5, 0.9, 1 - 1e-6):
        assert abs(beta_icdf(u, a, b) - scipy_stats.beta.ppf(u, a, b)) < 1e-9


def test_softplus_inverse():
    for y in (1e-6, 0.4, 1.4, 30.0):
        x = softplus_inverse(y)
        assert abs(torch.nn.functional.softplus(_t(x)).item() - y) < 1e-12 * max(1, y)


def _policy(seed=0, mean=0.6, conc=4.0):
    return BetaPolicy(6, 16, 2, mean, conc, torch.Generator().manual_seed(seed))


def test_policy_init_holds_for_any_state():
    policy = _policy()
    states = torch.randn(50, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    a, b = policy(states)
    torch.testing.assert_close(a + b, torch.full_like(a, 4.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(a / (a + b), torch.full_like(a, 0.6), rtol=0, atol=1e-12)
    assert (a > 1).all() and (b > 1).all()


def test_policy_rejects_init_with_a_or_b_below_one():
    with pytest.raises(ValueError, match="controller_init_mean"):
        _policy(mean=0.1, conc=4.0)


def test_policy_does_not_touch_global_rng():
    before = torch.random.get_rng_state()
    _policy()
    assert torch.equal(before, torch.random.get_rng_state())


def test_sampling_is_deterministic_and_beta_distributed(scipy_stats):
    policy, state = _policy(), [0.0] * 6
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    xs = [policy.sample(state, g1)[0] for _ in range(400)]
    assert xs == [policy.sample(state, g2)[0] for _ in range(400)]
    assert all(0 < x < 1 for x in xs)
    ks = scipy_stats.kstest(xs, scipy_stats.beta(2.4, 1.6).cdf)
    assert ks.pvalue > 1e-3
    assert abs(sum(xs) / len(xs) - 0.6) < 0.05
    assert not math.isnan(sum(xs))
