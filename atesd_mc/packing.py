"""Sequence packing into token-budget bins (first-fit-decreasing).

The C++ extension (atesd_mc._native) does the work when it was built; the pure-Python fallback
below gives identical output and is what the extension is tested against."""
from __future__ import annotations

from typing import Sequence

try:
    from atesd_mc import _native
except ImportError:  # built with ATESD_SKIP_NATIVE=1, or not built yet
    _native = None


def first_fit_decreasing_py(lengths: Sequence[int], budget: int) -> tuple[list[int], list[int], int]:
    """Longest first (ties by input order) into the first bin with room."""
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # sorted() is stable
    bins, offsets, used = [-1] * len(lengths), [0] * len(lengths), []
    for idx in order:
        n = lengths[idx]
        if n < 0 or n > budget:
            raise ValueError(f"sequence {idx} has length {n}, outside [0, budget={budget}]")
        b = next((j for j, u in enumerate(used) if u + n <= budget), len(used))
        if b == len(used):
            used.append(0)
        bins[idx], offsets[idx] = b, used[b]
        used[b] += n
    return bins, offsets, len(used)


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> tuple[list[int], list[int], int]:
    """(bin index per sequence, token offset in its bin, number of bins)."""
    if _native is None:
        return first_fit_decreasing_py(lengths, budget)
    lengths = [int(x) for x in lengths]
    return tuple(_native.first_fit_decreasing(lengths, int(budget)))  # type: ignore[return-value]


def native_available() -> bool:
    return _native is not None
