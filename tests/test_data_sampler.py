"""Distributed, resumable batch sampler."""
from __future__ import annotations

import pytest

from atesd_mc.data.sampler import DistributedBatchSampler, choose_probe_indices


def _ranks(n, bpr, dp, **kw):
    return [DistributedBatchSampler(n, batch_per_rank=bpr, dp_rank=r, dp_size=dp, **kw)
            for r in range(dp)]


def test_ranks_partition_each_epoch_without_the_probe_set():
    probe = choose_probe_indices(103, 7, seed=5)
    assert probe == choose_probe_indices(103, 7, seed=5) and len(set(probe)) == 7
    ranks = _ranks(103, 4, 3, seed=1, exclude=probe)
    assert ranks[0].steps_per_epoch == (103 - 7) // 12 == 8
    seen = []
    for step in range(8):
        batches = [s.next_batch() for s in ranks]
        assert all(len(b) == 4 for b in batches)
        seen += [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 96  # no repeats within an epoch
    assert not set(seen) & set(probe)
    assert all(s.state.epoch == 1 and s.state.step == 0 for s in ranks)  # dropped remainder
    # A new epoch is a different order of the same eligible pool.
    nxt = [i for _ in range(8) for s in ranks for i in s.next_batch()]
    assert nxt != seen and not set(nxt) & set(probe)


def test_deterministic_and_pure_indices():
    a, b = _ranks(50, 5, 1, seed=3)[0], _ranks(50, 5, 1, seed=3)[0]
    assert [a.next_batch() for _ in range(25)] == [b.indices(e, s) for e in range(3)
                                                   for s in range(10)][:25]
    assert _ranks(50, 5, 1, seed=4)[0].indices(0, 0) != a.indices(0, 0)


def test_resume_continues_the_same_stream():
    full = _ranks(40, 3, 2, seed=9)
    ref = [[s.next_batch() for s in full] for _ in range(15)]
    first = _ranks(40, 3, 2, seed=9)
    for _ in range(7):
        [s.next_batch() for s in first]
    states = [s.state_dict() for s in first]
    resumed = _ranks(40, 3, 2, seed=9)
    for s, st in zip(resumed, states):
        s.load_state_dict(st)
    assert [[s.next_batch() for s in resumed] for _ in range(8)] == ref[7:]


def test_resume_on_another_dp_size_with_the_same_global_batch():
    two = _ranks(60, 6, 2, seed=0)
    for _ in range(4):
        [s.next_batch() for s in two]
    state = two[0].state_dict()
    want = [i for s in two for i in s.next_batch()]
    three = _ranks(60, 4, 3, seed=0)
    for s in three:
        s.load_state_dict(state)
    assert [i for s in three for i in s.next_batch()] == want


def test_refuses_a_state_from_another_stream():
    s = _ranks(40, 4, 1, seed=1, exclude=[0, 1])[0]
    state = s.state_dict()
    for other in (_ranks(40, 4, 1, seed=2, exclude=[0, 1])[0],
                  _ranks(40, 4, 1, seed=1, exclude=[0, 2])[0],
                  _ranks(41, 4, 1, seed=1, exclude=[0, 1])[0],
                  _ranks(40, 2, 1, seed=1, exclude=[0, 1])[0]):
        with pytest.raises(ValueError, match="sampler state mismatch"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="cannot fill"):
        DistributedBatchSampler(10, batch_per_rank=4, dp_size=2, exclude=range(3))
    with pytest.raises(ValueError):
        DistributedBatchSampler(10, batch_per_rank=1, dp_rank=2, dp_size=2)


def test_every_dp_size_sees_the_same_global_batches_in_order():
    """Layout invariance: rank r's slice starts at global position first_index, and the global
    batches (across an epoch boundary) do not depend on how many ranks share them."""
    one = _ranks(64, 8, 1, seed=2, exclude=[3, 9])[0]
    ref = [one.next_batch() for _ in range(12)]  # 62 // 8 = 7 steps per epoch
    assert len({i for b in ref[:7] for i in b}) == 56
    for dp in (2, 4, 8):
        ranks = _ranks(64, 8 // dp, dp, seed=2, exclude=[3, 9])
        assert [s.first_index for s in ranks] == [r * (8 // dp) for r in range(dp)]
        assert [[i for s in ranks for i in s.next_batch()] for _ in range(12)] == ref
    a, b = _ranks(64, 4, 2, seed=2, exclude=[3, 9])
    assert [a.next_global_batch() for _ in range(12)] == [b.next_global_batch() for _ in range(12)] == ref
