"""The reveal ratio alpha: how much of the reference reasoning the teacher sees (ATESD_SPEC §2).

The reference y* is split into reasoning segments r_1..r_m and a final answer A. The teacher sees
[x ; r_1..r_k ; A ; transition] with k = floor(alpha * m): a prefix cut, never a token mask.
alpha = 0 reveals no reasoning (problem + answer + transition), alpha = 1 reveals all of it (OPSD).

Segmentation itself (paragraphs, then lines, then sentences) belongs to the data pipeline; this
module only turns (segment boundaries, alpha) into how much of the reasoning is shown.
"""
from __future__ import annotations

import math
from typing import Sequence

REVEAL_UNITS = ("segment", "token")

# alpha * m is computed in binary floating point, so a product that is an integer in exact
# arithmetic can land just below it (0.29 * 100 == 28.999999999999996). Adding an absolute
# epsilon before the floor makes such products count the boundary segment. 1e-9 is far larger
# than the rounding error of alpha * m for any m below ~1e6 (about m * 1.1e-16) and far smaller
# than the 1/m spacing between reveal levels, so it never moves a genuinely-below value up.
_FLOOR_EPS = 1e-9


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):  # also rejects NaN
        raise ValueError(f"reveal ratio alpha must be in [0, 1], got {alpha!r}")
    return alpha


def revealed_count(alpha: float, m: int) -> int:
    """floor(alpha * m), robust to float error (see _FLOOR_EPS); result is in [0, m]."""
    alpha = _check_alpha(alpha)
    if m < 0:
        raise ValueError(f"number of units m must be >= 0, got {m}")
    return min(m, int(math.floor(alpha * m + _FLOOR_EPS)))


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
