"""Reveal ratio: floor(alpha*m) prefix cut of the reference reasoning (docs/METHOD.md,
Reveal ratio)."""
import math

import pytest

from atesd_mc.exposure.reveal import reveal_text, reveal_tokens, revealed_count


@pytest.mark.parametrize("alpha,m,expected", [
    (0.5, 4, 2), (0.29, 100, 29), (0.7, 10, 7), (1 / 3, 3, 1), (0.999, 4, 3), (0.24, 4, 0),
    (0.25, 4, 1), (0.0, 7, 0), (1.0, 7, 7), (0.5, 0, 0), (0.57, 100, 57), (0.1 * 3, 10, 3),
    (0.58, 50, 29),  # 0.58 * 50 == 28.999999999999996 in floating point, 29 as written
])
def test_revealed_count_floor(alpha, m, expected):
    assert revealed_count(alpha, m) == expected


def test_revealed_count_matches_exact_floor_on_decimal_grid():
    # alphas that are exact decimals k/100: the float product must not lose the boundary
    for m in (1, 3, 4, 7, 10, 25, 100, 1000):
        for k in range(101):
            assert revealed_count(k / 100, m) == (k * m) // 100, (k, m)


@pytest.mark.parametrize("alpha", [-0.01, 1.01, math.nan])
def test_revealed_count_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError):
        revealed_count(alpha, 4)


ENDS = [5, 12, 20, 31]  # token offsets (exclusive) of four reasoning segments


def test_reveal_tokens_segment_unit():
    assert reveal_tokens(ENDS, 0.0, "segment") == 0  # problem + answer + transition only
    assert reveal_tokens(ENDS, 1.0, "segment") == 31  # the whole reasoning (OPSD)
    assert reveal_tokens(ENDS, 0.5, "segment") == 12
    assert reveal_tokens(ENDS, 0.74, "segment") == 12
    assert reveal_tokens(ENDS, 0.75, "segment") == 20
    assert reveal_tokens([], 0.7, "segment") == 0


def test_reveal_tokens_token_unit():
    assert reveal_tokens(ENDS, 0.0, "token") == 0
    assert reveal_tokens(ENDS, 1.0, "token") == 31
    assert reveal_tokens(ENDS, 0.5, "token") == 15
    assert reveal_tokens(ENDS, 0.5, "token", total_tokens=40) == 20


def test_reveal_tokens_rejects_bad_input():
    with pytest.raises(ValueError):
        reveal_tokens(ENDS, 0.5, "word")
    with pytest.raises(ValueError):
        reveal_tokens([5, 3], 0.5, "segment")


def test_reveal_text():
    segs, answer = ["a = 1", "b = 2", "c = 3", "d = 4"], "\\boxed{10}"
    assert reveal_text(segs, answer, 0.0) == answer
    assert reveal_text(segs, answer, 1.0) == "a = 1\n\nb = 2\n\nc = 3\n\nd = 4\n\n\\boxed{10}"
    assert reveal_text(segs, answer, 0.5, joiner="\n") == "a = 1\nb = 2\n\\boxed{10}"
