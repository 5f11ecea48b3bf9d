"""Rewards on hand-computed sequences (L = 3, gamma = 0.5)."""
import math

import numpy as np
import pytest

from atesd_mc.exposure.reward import (SignalSeries, advantages, batch_zscore, combine_rewards,
                                      decision_components, detrend, fit_trend, grounded_return,
                                      one_step_return, progress_return)

LOSSES = [2.0, 1.5, 1.7, 1.0]   # l_t0 .. l_t0+3
SCORES = [-1.0, -0.5, -0.2]     # g_t0+1 .. g_t0+3


def test_progress_return_by_hand():
    # 1*max(0, 2.0-1.5) + 0.5*max(0, 1.5-1.7) + 0.25*max(0, 1.7-1.0) = 0.5 + 0 + 0.175
    assert progress_return(LOSSES, 0.5) == pytest.approx(0.675, abs=1e-15)


def test_grounded_return_by_hand():
    # (1*-1.0 + 0.5*-0.5 + 0.25*-0.2) / (1 + 0.5 + 0.25) = -1.3 / 1.75
    assert grounded_return(SCORES, 0.5) == pytest.approx(-1.3 / 1.75, abs=1e-15)


def test_one_step_is_signed_immediate_progress():
    assert one_step_return(LOSSES) == pytest.approx(0.5)
    assert one_step_return([1.0, 1.25]) == pytest.approx(-0.25)


def test_variants():
    assert decision_components(LOSSES, SCORES, 0.5, "full") == (
        pytest.approx(0.675), pytest.approx(-1.3 / 1.75))
    assert decision_components(LOSSES, SCORES, 0.5, "lp_only") == (pytest.approx(0.675), None)
    assert decision_components(LOSSES, SCORES, 0.5, "one_step") == (pytest.approx(0.5), None)


def test_missing_values_skip_terms():
    # l_t0+2 missing: terms 2 and 3 skipped, only 1*max(0, 2.0-1.5) remains
    assert progress_return([2.0, 1.5, math.nan, 1.0], 0.5) == pytest.approx(0.5)
    # g_t0+2 missing: (1*-1.0 + 0.25*-0.2) / 1.25
    assert grounded_return([-1.0, math.inf, -0.2], 0.5) == pytest.approx(-1.05 / 1.25)
    assert progress_return([math.nan, 1.0, math.nan, 2.0], 0.5) is None
    assert grounded_return([math.nan] * 3, 0.5) is None
    assert one_step_return([math.nan, 1.0]) is None


def test_combine_and_advantages_by_hand():
    z = batch_zscore([1.0, 3.0, None])  # mean 2, population std 1
    assert z == [pytest.approx(-1.0), pytest.approx(1.0), 0.0]
    r = combine_rewards([0.5, 0.25, 0.0], z, 0.2, "full")
    assert r == [pytest.approx(0.3), pytest.approx(0.45), pytest.approx(0.0)]
    assert combine_rewards([0.5, 0.25], [], 0.2, "lp_only") == [0.5, 0.25]
    adv = advantages([1.0, 2.0, 3.0])  # std sqrt(2/3)
    s = math.sqrt(2 / 3)
    assert adv == [pytest.approx(-1 / s), pytest.approx(0.0), pytest.approx(1 / s)]


def test_zero_variance_gives_zero_advantages():
    assert advantages([0.7, 0.7, 0.7, 0.7]) == [0.0] * 4
    assert advantages([0.1 + 0.2, 0.3, 0.3]) == [0.0] * 3  # rounding-level differences
    assert batch_zscore([None, None]) == [0.0, 0.0]


def test_signal_series_window_and_prune():
    s = SignalSeries()
    s.set(0, 2.0, math.nan)
    s.set(3, 1.0, -0.5)  # gap at 1, 2 stays NaN
    losses, scores = s.window(0, 4)
    assert losses[0] == 2.0 and losses[3] == 1.0
    assert all(math.isnan(x) for x in losses[1:3] + [losses[4]])
    assert scores[3] == -0.5
    s.prune(3)
    assert s.start == 3 and s.window(3, 3) == ([1.0], [-0.5])
    with pytest.raises(ValueError):
        s.set(1, 0.0, 0.0)


def test_detrend_matches_float64_least_squares_and_removes_the_trend():
    # planted line R = 0.8 - 0.004 t plus noise; t are decision steps (every 5th update)
    rng = np.random.default_rng(0)
    t = np.arange(0, 400, 5, dtype=np.float64)
    r = 0.8 - 0.004 * t + rng.normal(0.0, 0.05, t.size)
    b_ref, a_ref = np.polyfit(t, r, 1)  # float64 least squares
    a, b = fit_trend(t.tolist(), r.tolist())
    assert a == pytest.approx(a_ref, rel=1e-10) and b == pytest.approx(b_ref, rel=1e-10)
    assert b == pytest.approx(-0.004, abs=5e-4)  # the planted slope is recovered
    res = np.array(detrend(t.tolist(), r.tolist(), t.tolist(), r.tolist()))
    np.testing.assert_allclose(res, r - (a_ref + b_ref * t), rtol=0, atol=1e-12)
    assert abs(np.corrcoef(res, t)[0, 1]) < 1e-10 and abs(np.corrcoef(r, t)[0, 1]) > 0.9
    # a batch is scored against the line of the whole history
    tail = detrend(t[-4:].tolist(), r[-4:].tolist(), t.tolist(), r.tolist())
    np.testing.assert_allclose(tail, res[-4:], rtol=0, atol=1e-12)


def test_fit_trend_degenerate_cases():
    assert fit_trend([5, 5, 5], [1.0, 2.0, 6.0]) == (3.0, 0.0)  # no spread in t: the mean
    assert fit_trend([0, 1, 2], [math.nan, 1.0, 3.0]) == (pytest.approx(-1.0), pytest.approx(2.0))
    assert fit_trend([], []) == (0.0, 0.0)
