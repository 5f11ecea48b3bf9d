"""Exposure schedules: the fixed and uniform-random baselines, and the factory that builds any
schedule (these two or the adaptive controller) from the config.

The step-level API they share is described in interface.py.
"""
from __future__ import annotations

from typing import Any

import torch

from .controller import AdaptiveController
from .interface import ExposureSchedule, check_kind, window_due


class FixedExposure:
    """Constant alpha (alpha = 1 is OPSD)."""

    kind = "fixed"

    def __init__(self, alpha: float) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"fixed alpha must be in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def alpha_for_step(self, step: int) -> float:
        return self.alpha

    def observe(self, step: int, **signals: Any) -> dict:
        return {"alpha": self.alpha}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "alpha": self.alpha}

    def load_state_dict(self, sd: dict) -> None:
        check_kind(sd, self.kind)
        self.alpha = float(sd["alpha"])


class RandomExposure:
    """alpha ~ U(alpha_min, alpha_max), redrawn at the start of every hold window."""

    kind = "random"

    def __init__(self, hold_steps: int, alpha_min: float, alpha_max: float, seed: int) -> None:
        if hold_steps < 1 or not 0.0 <= alpha_min <= alpha_max <= 1.0:
            raise ValueError(f"need hold_steps >= 1 and 0 <= alpha_min <= alpha_max <= 1, got "
                             f"{hold_steps}, {alpha_min}, {alpha_max}")
        self.hold_steps, self.alpha_min, self.alpha_max = hold_steps, alpha_min, alpha_max
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.alpha: float | None = None
        self.decided_step: int | None = None

    def alpha_for_step(self, step: int) -> float:
        if window_due(step, self.decided_step, self.hold_steps):
            u = torch.rand((), generator=self.generator, dtype=torch.float64, device="cpu").item()
            self.alpha = self.alpha_min + (self.alpha_max - self.alpha_min) * u
            self.decided_step = step
        return self.alpha

    def observe(self, step: int, **signals: Any) -> dict:
        return {"alpha": self.alpha}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "alpha": self.alpha, "decided_step": self.decided_step,
                "generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        check_kind(sd, self.kind)
        self.alpha, self.decided_step = sd["alpha"], sd["decided_step"]
        self.generator.set_state(sd["generator"])


def make_exposure(exposure_cfg, controller_cfg, total_steps: int, seed: int) -> ExposureSchedule:
    """Build the schedule named by exposure_cfg.atesd_exposure (adaptive | fixed | random)."""
    kind = exposure_cfg.atesd_exposure
    if kind == "fixed":
        return FixedExposure(exposure_cfg.reveal_ratio)
    if kind == "random":
        return RandomExposure(controller_cfg.hold_steps, exposure_cfg.alpha_min,
                              exposure_cfg.alpha_max, seed)
    if kind == "adaptive":
        return AdaptiveController(controller_cfg, exposure_cfg, total_steps, seed)
    raise ValueError(f"atesd_exposure must be adaptive, fixed or random, got {kind!r}")
