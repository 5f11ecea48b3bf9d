"""Controller state features: EMAs, Welford normalisation, NaN/Inf and zero-std robustness."""
import math

import numpy as np

from atesd_mc.exposure.features import Ema, RunningMoments, StateFeatures


def test_running_moments_match_numpy_and_skip_non_finite():
    xs = [3.0, -1.0, 2.5, 7.25, 0.0]
    m = RunningMoments()
    for x in xs[:2] + [math.nan, math.inf, None] + xs[2:]:
        m.update(x)
    assert m.count == 5
    assert abs(m.mean - np.mean(xs)) < 1e-12 and abs(m.std - np.std(xs)) < 1e-12
    assert abs(m.normalise(4.0) - (4.0 - np.mean(xs)) / (np.std(xs) + 1e-6)) < 1e-12


def test_constant_stream_normalises_to_zero_without_division_by_zero():
    m = RunningMoments()
    assert m.normalise(5.0) == 0.0  # no history
    for _ in range(10):
        m.update(2.0)
    assert m.std == 0.0 and m.normalise(2.0) == 0.0
    assert m.normalise(3.0, clip=5.0) == 5.0  # finite and clipped, not inf
    assert m.normalise(math.nan) == 0.0


def test_ema_starts_at_first_valid_value():
    e = Ema(0.9)
    e.update(math.nan)
    assert e.value is None
    e.update(2.0)
    e.update(math.inf)
    e.update(4.0)
    assert abs(e.value - (0.9 * 2.0 + 0.1 * 4.0)) < 1e-15


def test_state_features_shape_progress_and_robustness():
    f = StateFeatures(total_steps=10, decay=0.9)
    assert f.state(0) == [0.0] * 6  # nothing seen yet
    f.update(0, alpha=0.5, loss=1.0, mismatch=0.2, probe_nll=3.0, confidence=0.6)
    f.update(1, alpha=0.7, loss=math.nan, mismatch=math.inf, probe_nll=None, confidence=math.nan)
    raw = f.raw(2)
    assert raw[0] == 0.2
    assert abs(raw[1] - (0.9 * 0.5 + 0.1 * 0.7)) < 1e-15
    assert raw[2:] == [1.0, 0.2, 3.0, 0.6]  # NaN/Inf/None skipped
    s = f.state(2)
    assert len(s) == 6 and all(math.isfinite(x) and abs(x) <= 5 for x in s)
    assert s[2] == 0.0  # constant loss EMA -> std 0 -> z 0


def test_state_features_round_trip():
    f, g = StateFeatures(20, 0.9), StateFeatures(20, 0.9)
    for t in range(7):
        f.update(t, alpha=0.1 * t, loss=1 / (t + 1), mismatch=t, probe_nll=2 - 0.1 * t,
                 confidence=0.5)
    g.load_state_dict(f.state_dict())
    assert g.state(7) == f.state(7) and g.raw(7) == f.raw(7)
