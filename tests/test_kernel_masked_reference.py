"""pack_masked_reference against the per-sample Python oracle, reveal_lengths against exact rationals."""
import math
import random
from fractions import Fraction

import pytest
import torch

from atesd_mc.kernels import PackedSequences, Ragged, pack_masked_reference, reveal_lengths
from atesd_mc.kernels.reference import pack_masked_reference_ref
from test_kernel_divergence import needs_triton_cpu, one_thread  # noqa: F401

BACKENDS = ["torch", pytest.param("triton", marks=needs_triton_cpu)]
PIECES = ("student_prompt", "teacher_prefix", "reference", "answer", "transition", "rollout")


def random_batch(b, seed, max_len=40, device="cpu"):
    """Random pieces; empty ones included, but never an empty prompt before a non-empty rollout."""
    rnd = random.Random(seed)

    def seqs(lo, hi):
        return [[rnd.randrange(1, 150_000) for _ in range(rnd.randint(lo, hi))] for _ in range(b)]

    lists = dict(student_prompt=seqs(1, max_len), teacher_prefix=seqs(1, max_len), reference=seqs(0, 2 * max_len),
                 answer=seqs(0, 5), transition=seqs(0, 8), rollout=seqs(0, max_len))
    batch = {k: Ragged.from_lists(v, device=device) for k, v in lists.items()}
    keep = torch.tensor([rnd.randint(0, len(r)) for r in lists["reference"]], dtype=torch.int64, device=device)
    return batch, keep


def assert_matches_oracle(packed, batch, keep):
    ref_t, ref_s = pack_masked_reference_ref(*(tuple(x.cpu() for x in batch[k]) for k in PIECES), keep.cpu())
    for side, ref in ((packed.teacher, ref_t), (packed.student, ref_s)):
        assert isinstance(side, PackedSequences)
        assert side.cu_seqlens.dtype == torch.int32
        for got, want in zip(side, ref):
            assert got.dtype in (torch.int64, torch.int32)
            assert torch.equal(got.cpu().to(torch.int64), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,seed", [(1, 0), (3, 1), (7, 2), (16, 3)])
def test_pack_matches_oracle(backend, b, seed):
    batch, keep = random_batch(b, seed)
    assert_matches_oracle(pack_masked_reference(**batch, keep=keep, backend=backend), batch, keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollout_logits_line_up(backend):
    batch, keep = random_batch(5, 4)
    packed = pack_masked_reference(**batch, keep=keep, backend=backend)
    for side in packed:
        assert torch.equal(side.tokens[side.rollout_index], batch["rollout"].values)
        prev = side.rollout_index - 1  # the caller's next-token shift stays inside the sequence
        assert bool((side.positions[prev] + 1 == side.positions[side.rollout_index]).all())
    # full keep and zero keep are the two ends of the exposure range
    for k in (torch.zeros_like(keep), batch["reference"].lengths()):
        assert_matches_oracle(pack_masked_reference(**batch, keep=k, backend=backend), batch, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequences_and_empty_rollouts(backend):
    """Several kernel blocks per sample (lengths above the 1024 block), and samples without rollout."""
    batch, keep = random_batch(3, 5, max_len=700)
    lists = [[1, 2, 3], [], [4] * 1500]
    batch["rollout"] = Ragged.from_lists(lists)
    assert_matches_oracle(pack_masked_reference(**batch, keep=keep, backend=backend), batch, keep)


def test_tuple_inputs_and_errors():
    batch, keep = random_batch(2, 6)
    tuples = {k: (v.values, v.offsets) for k, v in batch.items()}
    assert_matches_oracle(pack_masked_reference(**tuples, keep=keep, backend="torch"), batch, keep)
    with pytest.raises(ValueError, match="keep"):
        pack_masked_reference(**batch, keep=batch["reference"].lengths() + 1)
    with pytest.raises(ValueError, match="keep"):
        pack_masked_reference(**batch, keep=keep[:1])
    with pytest.raises(ValueError, match="offsets"):
        pack_masked_reference(**{**batch, "answer": Ragged.from_lists([[1]])}, keep=keep)
    empty_prompt = {**batch, "student_prompt": Ragged.from_lists([[], [5]])}
    with pytest.raises(ValueError, match="non-empty prompt"):
        pack_masked_reference(**empty_prompt, keep=keep)


def exact_keep(ends: list[int], alpha: Fraction, unit: str) -> int:
    """Reference tokens revealed, in exact rational arithmetic (floor of alpha * m as written)."""
    if unit == "token":
        return math.floor(alpha * (ends[-1] if ends else 0))
    k = math.floor(alpha * len(ends))
    return ends[k - 1] if k > 0 else 0


def test_reveal_lengths_matches_exact_floor():
    rnd = random.Random(7)
    ends = []
    for _ in range(200):
        m = rnd.randint(0, 12)
        cuts = sorted(rnd.sample(range(1, 400), m))
        ends.append(cuts)
    # (float alpha, the number it stands for): 0.29 * 100 and 0.7 * 10 * k land just off an integer
    # in floating point; random 6-decimal alphas cover the rest of [0, 1]
    grid = [(0.0, Fraction(0)), (1.0, Fraction(1)), (0.29, Fraction(29, 100)), (0.7, Fraction(7, 10)),
            (1 / 3, Fraction(1, 3)), (0.5, Fraction(1, 2))]
    picks = []
    for _ in ends:
        q = rnd.randrange(10 ** 6 + 1)
        picks.append(rnd.choice(grid + [(q / 10 ** 6, Fraction(q, 10 ** 6))]))
    seg = Ragged.from_lists(ends)
    for unit in ("segment", "token"):
        got = reveal_lengths(seg, torch.tensor([a for a, _ in picks], dtype=torch.float64), unit=unit)
        assert got.tolist() == [exact_keep(e, x, unit) for e, (_, x) in zip(ends, picks)]
    # scalar alpha, and the documented semantics on one example: segments end at 3, 5, 9
    one = Ragged.from_lists([[3, 5, 9], [], [2, 4]])
    assert reveal_lengths(one, 0.7).tolist() == [5, 0, 2]        # floor(2.1)=2 segments, 0, floor(1.4)=1
    assert reveal_lengths(one, 0.5, unit="token").tolist() == [4, 0, 2]
    assert reveal_lengths(one, 1.0).tolist() == [9, 0, 4]
    assert 0.29 * 100 < 29  # the float product is just below 29; the reveal rule still shows 29 segments
    assert reveal_lengths(Ragged.from_lists([list(range(1, 101))]), 0.29).tolist() == [29]
    with pytest.raises(ValueError, match="alpha"):
        reveal_lengths(one, 1.5)
    with pytest.raises(ValueError, match="alpha"):
        reveal_lengths(Ragged.from_lists([[], []]), -0.1)  # checked even with nothing to reveal
    with pytest.raises(ValueError, match="unit"):
        reveal_lengths(one, 0.5, unit="word")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled():
    batch, keep = random_batch(64, 8, max_len=2000, device="cuda")
    assert_matches_oracle(pack_masked_reference(**batch, keep=keep, backend="triton"), batch, keep)
