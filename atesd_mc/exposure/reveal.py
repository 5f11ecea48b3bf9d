"""The reveal ratio alpha: how much of the reference reasoning the teacher sees (docs/METHOD.md, Reveal ratio).

The reference y* is split into reasoning segments r_1..r_m and a final answer A. The teacher sees
[x ; r_1..r_k ; A ; transition] with k = floor(alpha * m): a prefix cut, never a token mask.
alpha = 0 reveals no reasoning (problem + answer + transition), alpha = 1 reveals all of it (OPSD).

Segmentation itself (paragraphs, then lines, then sentences) belongs to the data pipeline; this
module only turns (segment boundaries, alpha) into how much of the reasoning is shown.
"""
from __future__ import annotations

from typing import Sequence

import torch

REVEAL_UNITS = ("segment", "token")

# The one reveal rule, k = floor(alpha * m), used by training (kernels.reveal_lengths), the
# teacher prompts (data/templates.py) and every tool. alpha * m is a binary floating-point
# product, so a value that is an integer in exact arithmetic can land just below it
# (0.29 * 100 == 28.999999999999996) and a plain floor would lose the boundary segment. So the
# product is first rounded to _DECIMALS decimal places (nearest, ties to even), then floored:
# k = floor(round(alpha * m, 6)). Why rounding the product rather than alpha itself: alphas
# written as decimals (0.29) and as fractions (1/3, so 1/3 * 3 == 1.0) both behave as written.
# Why 6 decimals: the float error of alpha * m is about m * 2e-16, far below the half-quantum
# 5e-7 for any m up to ~1e8, and 5e-7 is far below the 1/m spacing between reveal levels, so only
# products within 5e-7 under an integer move up. alpha = 0 and alpha = 1 stay exact (0 and m).
# The rounding is done in integers, (alpha * m * 1e6) to the nearest integer, then // 1e6: exact
# while m * 1e6 < 2**53 (m below 9e9 tokens).
_DECIMALS = 6
_SCALE = 10 ** _DECIMALS


def revealed_counts(alpha, m) -> torch.Tensor:
    """floor(alpha * m) under the rule above, elementwise; int64 in [0, m].

    alpha: float or float tensor in [0, 1] (read as float64), broadcast against m; m: int or
    int tensor >= 0 (segments, or tokens for the "token" unit). Out-of-range or NaN alpha and
    negative m raise ValueError rather than being clamped, since they mean a caller bug."""
    m = torch.as_tensor(m, dtype=torch.int64)
    a = torch.as_tensor(alpha, dtype=torch.float64, device=m.device)
    if bool(((a < 0) | (a > 1) | torch.isnan(a)).any()):
        raise ValueError(f"reveal ratio alpha must lie in [0, 1], got {alpha!r}")
    if bool((m < 0).any()):
        raise ValueError(f"number of units m must be >= 0, got {m.tolist()}")
    scaled = torch.round(a * m.to(torch.float64) * _SCALE).to(torch.int64)
    return torch.div(scaled, _SCALE, rounding_mode="floor")


def revealed_count(alpha: float, m: int) -> int:
    """Segments (or tokens) revealed out of m at ratio alpha: revealed_counts for one pair."""
    return int(revealed_counts(float(alpha), int(m)))


def reveal_tokens(segment_ends: Sequence[int], alpha: float, unit: str = "segment",
                  total_tokens: int | None = None) -> int:
    """Number of leading reasoning tokens the teacher sees.

    segment_ends: end offset (exclusive, in tokens, relative to the start of the reasoning) of
    each reasoning segment, increasing; the last one is the reasoning length unless total_tokens
    says otherwise. unit "segment": the end offset of the k-th segment, k = floor(alpha*m)
    (0 when k = 0). unit "token": floor(alpha * total_tokens).
    """
    ends = [int(e) for e in segment_ends]
    if any(b < a for a, b in zip(ends, ends[1:])) or (ends and ends[0] < 0):
        raise ValueError(f"segment_ends must be non-negative and non-decreasing, got {ends}")
    if unit == "segment":
        k = revealed_count(alpha, len(ends))
        return ends[k - 1] if k > 0 else 0
    if unit == "token":
        total = total_tokens if total_tokens is not None else (ends[-1] if ends else 0)
        return revealed_count(alpha, int(total))
    raise ValueError(f"reveal unit must be one of {REVEAL_UNITS}, got {unit!r}")


def reveal_text(segments: Sequence[str], answer: str, alpha: float, joiner: str = "\n\n") -> str:
    """The revealed reference as text: the first floor(alpha*m) segments, then the answer.

    For debugging and for generating from the teacher prompt; training uses reveal_tokens on
    token offsets. joiner goes between segments and before the answer (use "" when the
    segments keep their own separators).
    """
    k = revealed_count(alpha, len(segments))
    return joiner.join([*segments[:k], answer])
