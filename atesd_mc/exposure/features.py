"""Controller state s (docs/METHOD.md, Controller: State): six features, each normalised by a running mean/std.

  1 progress      fraction of student updates done, t / T_total
  2 alpha_ema     EMA of the alpha in use
  3 loss_ema      EMA of the distillation loss
  4 mismatch_ema  EMA of the student-teacher mismatch (KL or top-1 disagreement)
  5 probe_nll_ema EMA of the probe NLL
  6 confidence    latest batch student confidence (mean max-prob), not smoothed

Choices, and why:
- EMAs start at the first valid value (no zero-initialised bias towards 0).
- Normalisation uses Welford's all-history mean/variance, not EMA moments: several features
  trend over the run (progress rises, losses fall) and EMA moments would follow the trend and
  wash it out of the normalised value. The moments are updated once per observed step with the
  current raw feature values.
- z = (x - mean) / (std + 1e-6), clipped to [-5, 5]: no division by zero when a feature is
  constant (then z = 0), and a near-constant feature cannot feed huge values into the MLP.
- Non-finite (NaN/Inf) or missing inputs are skipped: the EMA keeps its value. A feature with
  no valid value yet is reported as 0 (its would-be mean).
"""
from __future__ import annotations

import math

FEATURE_NAMES = ("progress", "alpha_ema", "loss_ema", "mismatch_ema", "probe_nll_ema",
                 "confidence")
NUM_FEATURES = len(FEATURE_NAMES)


def is_finite(x) -> bool:
    """True for a real finite number (None, NaN, Inf and non-numbers are False)."""
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


class RunningMoments:
    """Welford running mean and (population) variance of a scalar stream."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x) -> bool:
        """Add x; non-finite values are skipped (returns False)."""
        if not is_finite(x):
            return False
        x = float(x)
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)
        return True

    @property
    def std(self) -> float:
        return math.sqrt(max(self.m2, 0.0) / self.count) if self.count else 0.0

    def normalise(self, x, eps: float = 1e-6, clip: float | None = None) -> float:
        """(x - mean) / (std + eps), optionally clipped; 0 for non-finite x or no history."""
        if not is_finite(x) or self.count == 0:
            return 0.0
        z = (float(x) - self.mean) / (self.std + eps)
        return max(-clip, min(clip, z)) if clip is not None else z

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, sd: dict) -> None:
        self.count, self.mean, self.m2 = int(sd["count"]), float(sd["mean"]), float(sd["m2"])


class Ema:
    """Exponential moving average that starts at its first valid value and skips non-finite."""

    def __init__(self, decay: float) -> None:
        self.decay, self.value = decay, None

    def update(self, x) -> None:
        if not is_finite(x):
            return
        x = float(x)
        self.value = x if self.value is None else self.decay * self.value + (1 - self.decay) * x


class StateFeatures:
    """Tracks the raw features and their normalisers; `state(step)` is the policy input."""

    def __init__(self, total_steps: int, decay: float, clip: float = 5.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps, self.clip = total_steps, clip
        self.emas = {name: Ema(decay) for name in FEATURE_NAMES[1:5]}
        self.confidence: float | None = None
        self.moments = [RunningMoments() for _ in FEATURE_NAMES]

    def update(self, step: int, *, alpha, loss, mismatch, probe_nll, confidence) -> None:
        """Fold in the statistics of student update `step` (0-based)."""
        for name, x in zip(FEATURE_NAMES[1:5], (alpha, loss, mismatch, probe_nll)):
            self.emas[name].update(x)
        if is_finite(confidence):
            self.confidence = float(confidence)
        # after update `step`, step + 1 updates are done: the progress the next decision sees
        for moments, value in zip(self.moments, self.raw(step + 1)):
            moments.update(value)

    def raw(self, step: int) -> list[float | None]:
        """Unnormalised features as seen before update `step` (None = no valid value yet)."""
        emas = [self.emas[name].value for name in FEATURE_NAMES[1:5]]
        return [max(step, 0) / self.total_steps, *emas, self.confidence]

    def state(self, step: int) -> list[float]:
        """Normalised, clipped state vector for a decision made before update `step`."""
        return [m.normalise(x, clip=self.clip) for m, x in zip(self.moments, self.raw(step))]

    def state_dict(self) -> dict:
        return {"emas": {k: e.value for k, e in self.emas.items()},
                "confidence": self.confidence,
                "moments": [m.state_dict() for m in self.moments]}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd["emas"].items():
            self.emas[k].value = None if v is None else float(v)
        self.confidence = None if sd["confidence"] is None else float(sd["confidence"])
        for m, msd in zip(self.moments, sd["moments"], strict=True):
            m.load_state_dict(msd)
