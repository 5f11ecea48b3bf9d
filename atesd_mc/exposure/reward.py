"""Decision rewards (docs/METHOD.md, Controller: Reward) and the per-step signal series they are computed from.

Index convention: l_t / g_t are the values *at the start of* student update t, i.e. measured
after update t-1. The trainer's observe(step=t) after update t therefore records index t+1, and
an optional observe(step=-1) before training records l_0. A decision made before update t0 is
scored on l_{t0..t0+L} and g_{t0+1..t0+L}, complete after update t0+L-1 (L updates later).

  G_lp = sum_{i=1..L} gamma^{i-1} max(0, l_{t0+i-1} - l_{t0+i})   positive-only progress
  G_gt = sum_i gamma^{i-1} g_{t0+i} / sum_i gamma^{i-1}            teacher-grounded score
  R    = G_lp + lambda_gt * z(G_gt)

Variants (ablations of the paper): "full" (R above), "lp_only" (G_lp, lambda_gt = 0),
"one_step" (signed immediate progress l_{t0} - l_{t0+1}, horizon 1, no G_gt).

z-scoring of G_gt ("gt_norm"): "batch" (default) over the decisions of one REINFORCE update:
G_gt is a log-probability whose level drifts as the model trains, and only its differences
between decisions that compete for the same update matter; "running" uses Welford moments of
all G_gt seen so far (z known at completion time). z = 0 where the std is 0.

Missing values: a G_lp term whose two endpoints are not both finite is skipped; G_gt averages
the finite g only (renormalising the weights); a decision whose progress part has no valid
term is dropped (a 0 reward would be a fake observation that biases the advantages); a missing
G_gt alone gives z = 0.

Advantage baseline ("advantage_baseline"): "batch" (the paper) z-scores R over the decisions of
one update; "detrended" first subtracts a least-squares line R ~ a + b t fitted to every decision
scored so far (t = its first step), then z-scores the residuals over the update (detrend).
"""
from __future__ import annotations

import math
from typing import Sequence

from .features import is_finite

REWARD_VARIANTS = ("full", "lp_only", "one_step")
GT_NORMS = ("batch", "running")
ADVANTAGE_BASELINES = ("batch", "detrended")


def check_variant(variant: str, gt_norm: str = "batch", baseline: str = "batch") -> None:
    if variant not in REWARD_VARIANTS:
        raise ValueError(f"reward_variant must be one of {REWARD_VARIANTS}, got {variant!r}")
    if gt_norm not in GT_NORMS:
        raise ValueError(f"reward_gt_norm must be one of {GT_NORMS}, got {gt_norm!r}")
    if baseline not in ADVANTAGE_BASELINES:
        raise ValueError(f"advantage_baseline must be one of {ADVANTAGE_BASELINES}, "
                         f"got {baseline!r}")


def reward_horizon(variant: str, lookahead: int) -> int:
    """Updates after the decision until it can be scored."""
    return 1 if variant == "one_step" else lookahead


def progress_return(losses: Sequence[float], gamma: float) -> float | None:
    """G_lp from l_{t0}..l_{t0+L} (L+1 values); None when no term is valid."""
    total, valid = 0.0, False
    for i in range(1, len(losses)):
        prev, cur = losses[i - 1], losses[i]
        if is_finite(prev) and is_finite(cur):
            total += gamma ** (i - 1) * max(0.0, prev - cur)
            valid = True
    return total if valid else None


def grounded_return(scores: Sequence[float], gamma: float) -> float | None:
    """G_gt from g_{t0+1}..g_{t0+L}: discount-weighted mean over the finite values."""
    num = den = 0.0
    for i, g in enumerate(scores, start=1):
        if is_finite(g):
            num += gamma ** (i - 1) * g
            den += gamma ** (i - 1)
    return num / den if den > 0 else None


def one_step_return(losses: Sequence[float]) -> float | None:
    """Signed immediate progress l_{t0} - l_{t0+1}."""
    if len(losses) < 2 or not (is_finite(losses[0]) and is_finite(losses[1])):
        return None
    return losses[0] - losses[1]


def decision_components(losses: Sequence[float], scores: Sequence[float], gamma: float,
                        variant: str) -> tuple[float | None, float | None]:
    """(progress part, G_gt) of one decision; progress None means drop the decision."""
    if variant == "one_step":
        return one_step_return(losses), None
    lp = progress_return(losses, gamma)
    return lp, (grounded_return(scores, gamma) if variant == "full" else None)


def batch_zscore(values: Sequence[float | None], eps: float = 1e-8) -> list[float]:
    """Population z-scores over the finite values; None/non-finite and zero-std give 0."""
    xs = [float(v) for v in values if is_finite(v)]
    if not xs:
        return [0.0] * len(values)
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
    if std <= eps:
        return [0.0] * len(values)
    return [(float(v) - mean) / (std + eps) if is_finite(v) else 0.0 for v in values]


def combine_rewards(progress: Sequence[float], z_gt: Sequence[float], lambda_gt: float,
                    variant: str) -> list[float]:
    """R_j = progress_j (+ lambda_gt * z_j for the full variant)."""
    if variant != "full":
        return [float(p) for p in progress]
    return [float(p) + lambda_gt * float(z) for p, z in zip(progress, z_gt, strict=True)]


def advantages(rewards: Sequence[float], eps: float = 1e-8) -> list[float]:
    """A_j = (R_j - mean R) / (std R + eps), population std; all 0 when the std is ~0 (equal
    rewards carry no preference, and this avoids amplifying rounding noise)."""
    return batch_zscore(rewards, eps)


def fit_trend(ts: Sequence[float], rs: Sequence[float]) -> tuple[float, float]:
    """Least-squares line R ~ a + b t over the finite pairs; b = 0 when t has no spread (the
    line is then the mean), and (0, 0) when no pair is finite."""
    pairs = [(float(t), float(r)) for t, r in zip(ts, rs, strict=True) if is_finite(r)]
    if not pairs:
        return 0.0, 0.0
    n = len(pairs)
    t_mean = sum(t for t, _ in pairs) / n
    r_mean = sum(r for _, r in pairs) / n
    stt = sum((t - t_mean) ** 2 for t, _ in pairs)
    b = sum((t - t_mean) * (r - r_mean) for t, r in pairs) / stt if stt > 0 else 0.0
    return r_mean - b * t_mean, b


def detrend(ts: Sequence[float], rs: Sequence[float], history_ts: Sequence[float],
            history_rs: Sequence[float]) -> list[float]:
    """Residuals R - (a + b t) of (ts, rs) around the line fitted to the history: removes the
    part of a reward that only says *when* a decision was made (progress falls as training
    goes on), so the advantage compares decisions at equal training time."""
    a, b = fit_trend(history_ts, history_rs)
    return [float(r) - (a + b * float(t)) for t, r in zip(ts, rs, strict=True)]


class SignalSeries:
    """l_k and g_k for a sliding range of indices k (see the module docstring)."""

    def __init__(self) -> None:
        self.start = 0
        self.loss: list[float] = []
        self.score: list[float] = []

    def set(self, k: int, loss, score) -> None:
        if k < self.start:
            raise ValueError(f"signal index {k} is before the kept range (start {self.start})")
        while self.start + len(self.loss) <= k:  # gaps stay NaN
            self.loss.append(math.nan)
            self.score.append(math.nan)
        i = k - self.start
        self.loss[i] = float(loss) if is_finite(loss) else math.nan
        self.score[i] = float(score) if is_finite(score) else math.nan

    def window(self, first: int, last: int) -> tuple[list[float], list[float]]:
        """(losses, scores) for k = first..last inclusive; unknown indices are NaN."""
        def get(series, k):
            i = k - self.start
            return series[i] if 0 <= i < len(series) else math.nan
        ks = range(first, last + 1)
        return [get(self.loss, k) for k in ks], [get(self.score, k) for k in ks]

    def prune(self, keep_from: int) -> None:
        """Forget indices below keep_from (no open or future decision needs them)."""
        if keep_from <= self.start:
            return
        del self.loss[:keep_from - self.start], self.score[:keep_from - self.start]
        self.start = keep_from

    def state_dict(self) -> dict:
        return {"start": self.start, "loss": list(self.loss), "score": list(self.score)}

    def load_state_dict(self, sd: dict) -> None:
        self.start = int(sd["start"])
        self.loss = [float(x) for x in sd["loss"]]
        self.score = [float(x) for x in sd["score"]]
