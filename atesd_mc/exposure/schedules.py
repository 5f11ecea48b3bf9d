"""Exposure schedules: the fixed, linear-ramp and uniform-random baselines, and the factory that
builds any schedule (these three or the adaptive controller) from the config.

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


class RampExposure:
    """alpha linear in the step, from `start` at step 0 to `end` at step total_steps - 1, a new
    value every step: the fixed schedule that asks whether a learned drift of alpha (the paper's
    0.5 -> 0.7-0.8) helps by itself, without any learning. Steps outside [0, total_steps - 1]
    get the nearer end's alpha."""

    kind = "ramp"

    def __init__(self, start: float, end: float, total_steps: int) -> None:
        if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0 and total_steps >= 1):
            raise ValueError(f"ramp needs start, end in [0, 1] and total_steps >= 1, got "
                             f"{start!r}, {end!r}, {total_steps!r}")
        self.start, self.end, self.total_steps = float(start), float(end), int(total_steps)

    def alpha_for_step(self, step: int) -> float:
        last = self.total_steps - 1
        f = min(max(step, 0), last) / last if last > 0 else 0.0
        return self.start * (1.0 - f) + self.end * f  # exact endpoints at f = 0 and f = 1

    def observe(self, step: int, **signals: Any) -> dict:
        return {"alpha": self.alpha_for_step(step)}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "start": self.start, "end": self.end,
                "total_steps": self.total_steps}

    def load_state_dict(self, sd: dict) -> None:
        check_kind(sd, self.kind)
        self.start, self.end = float(sd["start"]), float(sd["end"])
        self.total_steps = int(sd["total_steps"])


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
    """Build the schedule named by exposure_cfg.atesd_exposure (adaptive | fixed | random | ramp)."""
    kind = exposure_cfg.atesd_exposure
    if kind == "fixed":
        return FixedExposure(exposure_cfg.reveal_ratio)
    if kind == "ramp":
        return RampExposure(exposure_cfg.ramp_start, exposure_cfg.ramp_end, total_steps)
    if kind == "random":
        return RandomExposure(controller_cfg.hold_steps, exposure_cfg.alpha_min,
                              exposure_cfg.alpha_max, seed)
    if kind == "adaptive":
        return AdaptiveController(controller_cfg, exposure_cfg, total_steps, seed)
    raise ValueError(f"atesd_exposure must be adaptive, fixed, random or ramp, got {kind!r}")
