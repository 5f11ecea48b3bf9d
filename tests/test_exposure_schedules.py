"""Fixed and random exposure baselines and the make_exposure factory."""
import io

import pytest
import torch

from atesd_mc.config import ControllerConfig, ExposureConfig
from atesd_mc.config_check import ConfigError
from atesd_mc.config_io import parse_config
from atesd_mc.exposure import (AdaptiveController, FixedExposure, RandomExposure,
                               make_exposure)
from atesd_mc.exposure.schedules import RampExposure


def test_fixed_exposure():
    s = FixedExposure(0.5)
    assert [s.alpha_for_step(t) for t in range(3)] == [0.5] * 3
    assert s.observe(0, loss=1.0, probe_nll=float("nan"))["alpha"] == 0.5
    t = FixedExposure(1.0)
    t.load_state_dict(s.state_dict())
    assert t.alpha_for_step(9) == 0.5
    with pytest.raises(ValueError):
        FixedExposure(1.5)


def test_random_exposure_windows_range_and_determinism():
    a = RandomExposure(hold_steps=4, alpha_min=0.2, alpha_max=0.6, seed=7)
    alphas = [a.alpha_for_step(t) for t in range(20)]
    windows = [alphas[i:i + 4] for i in range(0, 20, 4)]
    assert all(len(set(w)) == 1 for w in windows) and len({w[0] for w in windows}) == 5
    assert all(0.2 <= x <= 0.6 for x in alphas)
    b = RandomExposure(4, 0.2, 0.6, seed=7)
    assert [b.alpha_for_step(t) for t in range(20)] == alphas


def test_random_exposure_round_trip_mid_window():
    ref = RandomExposure(3, 0.0, 1.0, seed=1)
    expected = [ref.alpha_for_step(t) for t in range(14)]
    first = RandomExposure(3, 0.0, 1.0, seed=1)
    got = [first.alpha_for_step(t) for t in range(7)]
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = RandomExposure(3, 0.0, 1.0, seed=123)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert got + [resumed.alpha_for_step(t) for t in range(7, 14)] == expected


def test_make_exposure_dispatch():
    ctrl = ControllerConfig(hold_steps=2)
    fixed = make_exposure(ExposureConfig(atesd_exposure="fixed", reveal_ratio=0.25), ctrl, 10, 0)
    assert isinstance(fixed, FixedExposure) and fixed.alpha_for_step(0) == 0.25
    rnd = make_exposure(ExposureConfig(atesd_exposure="random", alpha_min=0.1, alpha_max=0.2),
                        ctrl, 10, 0)
    assert isinstance(rnd, RandomExposure) and 0.1 <= rnd.alpha_for_step(0) <= 0.2
    adaptive = make_exposure(ExposureConfig(), ctrl, 10, 0)
    assert isinstance(adaptive, AdaptiveController) and adaptive.variant == "full"
    with pytest.raises(ValueError, match="adaptive"):
        adaptive.load_state_dict(fixed.state_dict())


def test_ramp_exposure_endpoints_middle_and_round_trip():
    r = RampExposure(0.5, 0.8, total_steps=101)
    assert r.alpha_for_step(0) == 0.5 and r.alpha_for_step(100) == 0.8
    assert r.alpha_for_step(50) == pytest.approx(0.65, abs=1e-15)
    assert r.alpha_for_step(25) == pytest.approx(0.5 + 0.3 * 25 / 100, abs=1e-15)
    alphas = [r.alpha_for_step(t) for t in range(101)]
    assert all(a < b for a, b in zip(alphas, alphas[1:]))  # a new value every step
    assert r.alpha_for_step(150) == 0.8 and r.observe(7, loss=1.0)["alpha"] == alphas[7]
    assert RampExposure(0.9, 0.4, total_steps=1).alpha_for_step(0) == 0.9
    resumed = RampExposure(0.0, 1.0, total_steps=5)
    buf = io.BytesIO()
    torch.save(r.state_dict(), buf)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert [resumed.alpha_for_step(t) for t in range(101)] == alphas
    with pytest.raises(ValueError, match="fixed"):
        resumed.load_state_dict(FixedExposure(0.5).state_dict())
    with pytest.raises(ValueError):
        RampExposure(0.5, 1.2, total_steps=10)


def test_ramp_from_flags_through_make_exposure():
    cfg = parse_config(["--atesd-exposure", "ramp", "--ramp-start", "0.4", "--ramp-end", "0.9"])
    assert (cfg.exposure.atesd_exposure, cfg.exposure.ramp_start, cfg.exposure.ramp_end) == \
        ("ramp", 0.4, 0.9)
    s = make_exposure(cfg.exposure, cfg.controller, 11, 0)
    assert isinstance(s, RampExposure)
    assert [s.alpha_for_step(t) for t in (0, 5, 10)] == [0.4, pytest.approx(0.65), 0.9]
    assert ExposureConfig().ramp_start == 0.5 and ExposureConfig().ramp_end == 0.8
    with pytest.raises(ConfigError, match="ramp_end"):
        parse_config(["--atesd-exposure", "ramp", "--ramp-end", "1.5"])
