"""Distributed, resumable batch sampler over a problem store.

Each epoch is a fresh permutation of the eligible indices (all minus the held-out probe set),
drawn from numpy's PCG64 seeded by (seed, epoch), so it depends on nothing but those two
numbers. A global batch is ``batch_per_rank * dp_size`` consecutive permuted indices; rank r
takes the r-th contiguous slice of it, so the global batches and their order are the same for
every ``dp_size`` with the same global batch, and the example at global position j of a step is
the same whichever rank holds it (``first_index``: where this rank's slice starts). The incomplete last global batch of an epoch is dropped so
every rank always gets a full batch and the ranks never disagree on when an epoch ends.

The position (epoch, step within the epoch) is checkpointed with ``state_dict()``. Resuming with
another ``dp_size`` is allowed as long as the global batch is the same: the stream of global
batches does not change, only how it is split between ranks.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np


def choose_probe_indices(num_examples: int, size: int, seed: int) -> list[int]:
    """A fixed, sorted random subset (the probe set kept out of the batch stream)."""
    if not 0 <= size <= num_examples:
        raise ValueError(f"probe size {size} outside [0, {num_examples}]")
    rng = np.random.Generator(np.random.PCG64([seed, 0x9E3779B9]))  # not the epoch stream
    return sorted(int(i) for i in rng.choice(num_examples, size=size, replace=False))


def _exclude_digest(exclude: Iterable[int]) -> str:
    return hashlib.sha256(np.asarray(sorted(exclude), dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass
class SamplerState:
    """Where the sampler is: the next batch is step `step` of epoch `epoch`."""

    epoch: int = 0
    step: int = 0
    consumed: int = 0
    """Global batches handed out since the start (all epochs)."""


class DistributedBatchSampler:
    """(seed, epoch, step, dp_rank, dp_size, batch_per_rank) -> this rank's example indices; the
    global batch depends on (seed, epoch, step, dp_size * batch_per_rank) only."""

    def __init__(self, num_examples: int, *, batch_per_rank: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, exclude: Iterable[int] = ()):
        if batch_per_rank <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad batch_per_rank={batch_per_rank}, dp_rank={dp_rank}, "
                             f"dp_size={dp_size}")
        excluded = {int(i) for i in exclude}
        if any(not 0 <= i < num_examples for i in excluded):
            raise ValueError(f"exclude holds indices outside [0, {num_examples})")
        self.num_examples, self.seed = num_examples, seed
        self.batch_per_rank, self.dp_rank, self.dp_size = batch_per_rank, dp_rank, dp_size
        self.eligible = np.setdiff1d(np.arange(num_examples), np.fromiter(excluded, np.int64,
                                                                           len(excluded)))
        self.exclude_digest = _exclude_digest(excluded)
        self.global_batch = batch_per_rank * dp_size
        self.first_index = dp_rank * batch_per_rank
        """Global position (within each global batch) of this rank's first example."""
        self.steps_per_epoch = len(self.eligible) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.eligible)} eligible examples cannot fill one global "
                             f"batch of {self.global_batch}")
        self.state = SamplerState()
        self._perm_epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm, self._perm_epoch = rng.permutation(self.eligible), epoch
        return self._perm

    def global_indices(self, epoch: int, step: int) -> list[int]:
        """The whole global batch of (epoch, step), in global order; pure."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step {step} outside [0, {self.steps_per_epoch})")
        start = step * self.global_batch
        return [int(i) for i in self.permutation(epoch)[start:start + self.global_batch]]

    def indices(self, epoch: int, step: int) -> list[int]:
        """This rank's indices for (epoch, step); pure: no state is read or changed."""
        out = self.global_indices(epoch, step)
        return out[self.first_index:self.first_index + self.batch_per_rank]

    def next_global_batch(self) -> list[int]:
        """The global batch at the current position, then advance (rolling over to the next
        epoch); every rank gets the same list."""
        s = self.state
        out = self.global_indices(s.epoch, s.step)
        s.step, s.consumed = s.step + 1, s.consumed + 1
        if s.step == self.steps_per_epoch:
            s.epoch, s.step = s.epoch + 1, 0
        return out

    def next_batch(self) -> list[int]:
        """This rank's slice of next_global_batch()."""
        return self.next_global_batch()[self.first_index:self.first_index + self.batch_per_rank]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "step": self.state.step,
                "consumed": self.state.consumed, "seed": self.seed,
                "num_examples": self.num_examples, "global_batch": self.global_batch,
                "exclude_digest": self.exclude_digest}

    def load_state_dict(self, state: dict) -> None:
        """Resume; refuses a state from a different data stream (seed, data, batch, probe set)."""
        for key in ("seed", "num_examples", "global_batch", "exclude_digest"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state mismatch: {key} is {state.get(key)!r} in the "
                                 f"checkpoint, {getattr(self, key)!r} now")
        if not 0 <= state["step"] < self.steps_per_epoch:
            raise ValueError(f"sampler state step {state['step']} outside "
                             f"[0, {self.steps_per_epoch})")
        self.state = SamplerState(int(state["epoch"]), int(state["step"]), int(state["consumed"]))
