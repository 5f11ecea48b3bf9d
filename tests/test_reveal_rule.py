"""The one reveal rule (atesd_mc.exposure.reveal) against exact rational arithmetic.

Every alpha k/100 is given as the float k/100 (what a config or the controller passes) and must
reveal floor(k/100 * m) exactly, through every path that counts revealed units: the scalar
function, its vectorised form, reveal_tokens and the packing path's reveal_lengths."""
import math
from fractions import Fraction

import pytest
import torch

from atesd_mc.exposure.reveal import revealed_count, revealed_counts, reveal_tokens
from atesd_mc.kernels import Ragged, reveal_lengths

KS = range(101)
MS = range(1, 65)


def exact(k: int, m: int) -> int:
    return math.floor(Fraction(k, 100) * m)


def test_scalar_rule_is_exact_on_decimal_grid():
    for k in KS:
        for m in MS:
            assert revealed_count(k / 100, m) == exact(k, m), (k, m)


def test_vectorised_rule_is_exact_on_decimal_grid():
    alphas = torch.tensor([k / 100 for k in KS], dtype=torch.float64)[:, None]
    got = revealed_counts(alphas, torch.tensor(list(MS)))  # broadcast to [101, 64]
    assert got.dtype == torch.int64
    assert got.tolist() == [[exact(k, m) for m in MS] for k in KS]


def test_the_grid_has_products_just_below_an_integer():
    # the reason for the rule: a plain float floor gets such products wrong (0.29 * 100 -> 28);
    # on this grid 0.58 * 50 == 28.999999999999996, so the tests above do exercise the boundary
    wrong = [(k, m) for k in KS for m in MS if math.floor(k / 100 * m) != exact(k, m)]
    assert (58, 50) in wrong and math.floor(0.29 * 100) == 28
    assert revealed_count(0.58, 50) == 29 and revealed_count(0.29, 100) == 29


def test_packing_path_is_exact_on_decimal_grid():
    """reveal_lengths, which training packs with: one sample per m, segment i ending at token
    3 * (i + 1) (so the keep identifies k), and the token unit over a 1-segment reference of m
    tokens; alpha both as a scalar and as a per-sample tensor."""
    seg = Ragged.from_lists([[3 * (i + 1) for i in range(m)] for m in MS])
    tok = Ragged.from_lists([[m] for m in MS])
    for k in KS:
        want = [exact(k, m) for m in MS]
        per_sample = torch.full((len(MS),), k / 100, dtype=torch.float64)
        for alpha in (k / 100, per_sample):
            assert reveal_lengths(seg, alpha, unit="segment").tolist() == [3 * n for n in want], k
            assert reveal_lengths(tok, alpha, unit="token").tolist() == want, k


def test_reveal_tokens_is_exact_on_decimal_grid():
    for k in KS:
        for m in MS:
            ends = [2 * (i + 1) for i in range(m)]
            assert reveal_tokens(ends, k / 100, "segment") == 2 * exact(k, m)
            assert reveal_tokens(ends, k / 100, "token") == math.floor(Fraction(k, 100) * 2 * m)


@pytest.mark.parametrize("m", [0, 1, 7, 10 ** 6, 10 ** 9])
def test_ends_of_the_range_are_exact(m):
    assert revealed_count(0.0, m) == 0
    assert revealed_count(1.0, m) == m
    assert revealed_counts(torch.tensor([0.0, 1.0]), m).tolist() == [0, m]


def test_only_products_within_the_rounding_quantum_move_up():
    # 1e-6 below an integer is a real value below it and floors down; half the quantum is 5e-7
    assert revealed_count(0.999999, 1) == 0
    assert revealed_count(0.2899999, 100) == 28  # 28.99999, well below 29
    assert revealed_count(1 / 3, 3) == 1 and revealed_count(2 / 3, 300) == 200


def test_rejects_bad_input():
    for alpha in (-0.01, 1.01, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            revealed_count(alpha, 4)
        with pytest.raises(ValueError, match="alpha"):
            revealed_counts(torch.tensor([0.5, alpha]), torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="m must be"):
        revealed_count(0.5, -1)
