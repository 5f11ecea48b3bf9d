"""The C++ first-fit-decreasing packer equals its pure-Python fallback."""
import random

import pytest

from atesd_mc import packing


def _check_valid(lengths, budget, bins, offsets, n_bins):
    used = {}
    for n, b, o in zip(lengths, bins, offsets):
        assert 0 <= b < n_bins
        used.setdefault(b, []).append((o, o + n))
    for spans in used.values():
        spans.sort()
        assert spans[-1][1] <= budget
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no overlap


@pytest.mark.skipif(not packing.native_available(), reason="extension not built (ATESD_SKIP_NATIVE=1)")
def test_native_equals_python_on_random_inputs():
    rng = random.Random(0)
    for _ in range(300):
        budget = rng.randint(1, 4096)
        lengths = [rng.randint(0, budget) for _ in range(rng.randint(0, 200))]
        want = packing.first_fit_decreasing_py(lengths, budget)
        got = packing.first_fit_decreasing(lengths, budget)
        assert list(got[0]) == want[0] and list(got[1]) == want[1] and got[2] == want[2]
        _check_valid(lengths, budget, *want)


def test_python_packing_is_first_fit_decreasing():
    bins, offsets, n = packing.first_fit_decreasing_py([3, 5, 2, 7], 8)
    # longest first: 7 -> bin 0, 5 -> bin 1, 3 -> bin 1 (5+3=8), 2 -> bin 2 (no room in 0 or 1)
    assert (bins, offsets, n) == ([1, 1, 2, 0], [5, 0, 0, 0], 3)


@pytest.mark.parametrize("fn", [packing.first_fit_decreasing_py, packing.first_fit_decreasing])
def test_overlong_sequence_is_an_error(fn):
    with pytest.raises(ValueError, match="sequence 1 has length 9"):
        fn([2, 9], 8)
