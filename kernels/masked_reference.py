"""Packing of teacher and student sequences for self-distillation (no padding).

Per sample b the inputs are CSR pieces (`Ragged(values, offsets)`, int64, offsets [B+1]):

    teacher_b = [teacher_prefix_b ; reference_b[:keep_b] ; answer_b ; transition_b ; rollout_b]
    student_b = [student_prompt_b ; rollout_b]

`keep_b` is how many reference tokens the teacher sees (see `reveal_lengths`). For each side the
result is a `PackedSequences`: token ids and position ids (restarting at 0 per sequence) over the
concatenated stream, `cu_seqlens` [B+1] (int32, the flash-attention / TE / megatron PackedSeqParams
convention) and `rollout_index` [R_total]: the stream position of every rollout token, in the order
of `rollout.values`. Teacher and student `rollout_index` therefore line up token by token.

Next-token shift: `rollout_index` points at the rollout tokens themselves. The logits that *predict*
rollout token r sit one position earlier, at `rollout_index[r] - 1`; the caller applies that shift.
It never crosses into the previous sequence because a non-empty rollout must follow a non-empty
prefix (checked here).

The Triton kernel runs one program per (block of output positions, sample): each output position
finds its piece by comparing with the running piece boundaries and gathers its token, so there is
no loop over tokens and no padding. The torch path is the same gather, vectorised over all tokens.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from atesd_mc.exposure.reveal import REVEAL_UNITS, revealed_counts

from ._dispatch import block_size, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


class Ragged(NamedTuple):
    """Flat values plus offsets [B+1]; sample b is values[offsets[b]:offsets[b+1]]."""
    values: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]], device=None) -> "Ragged":
        lens = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
        offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lens, 0)
        values = torch.tensor([int(x) for s in seqs for x in s], dtype=torch.int64)
        return cls(values.to(device), offsets.to(device))

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


class PackedSequences(NamedTuple):
    tokens: torch.Tensor         # [T_total] int64
    positions: torch.Tensor      # [T_total] int64, 0 at the start of every sequence
    cu_seqlens: torch.Tensor     # [B+1] int32
    rollout_index: torch.Tensor  # [R_total] int64: stream positions of the rollout tokens


class PackedPair(NamedTuple):
    teacher: PackedSequences
    student: PackedSequences


def reveal_lengths(segment_ends: Ragged, alpha, unit: str = "segment") -> torch.Tensor:
    """Reference tokens to reveal per sample, from the reasoning's segment boundaries.

    segment_ends: per sample, the exclusive end offset (in reference tokens) of each of its m segments,
    ascending; the last one is the reference length. alpha: float or [B] tensor in [0, 1].
    unit "segment": k = revealed_counts(alpha, m) whole segments -> keep = end of segment k (0 when k = 0).
    unit "token":   keep = revealed_counts(alpha, reference length).
    The count is the project's one reveal rule, atesd_mc.exposure.reveal (floor(alpha * m) with
    decimal alphas exact: 0.29 of 100 segments is 29)."""
    if unit not in REVEAL_UNITS:
        raise ValueError(f"unit must be one of {REVEAL_UNITS}, got {unit!r}")
    ends, off = segment_ends.values.to(torch.int64), segment_ends.offsets.to(torch.int64)
    m = off[1:] - off[:-1]
    k = revealed_counts(alpha, m)  # also validates alpha when no sample has a segment
    if ends.numel() == 0:
        return torch.zeros_like(m)

    def end_at(i: torch.Tensor) -> torch.Tensor:  # ends[i], i clamped; callers mask the invalid ones
        return ends[i.clamp(0, ends.numel() - 1)]

    if unit == "token":
        return revealed_counts(alpha, torch.where(m > 0, end_at(off[1:] - 1), torch.zeros_like(m)))
    return torch.where(k > 0, end_at(off[:-1] + k - 1), torch.zeros_like(k))


if triton is not None:

    @triton.jit
    def _pack_kernel(vals_ptr, starts_ptr, lens_ptr, cu_ptr, rcu_ptr, tok_ptr, pos_ptr, ridx_ptr, B,
                     P: tl.constexpr, BLOCK: tl.constexpr):
        """Output positions [j*BLOCK, (j+1)*BLOCK) of sample b; the last of the P pieces is the rollout."""
        b = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        out0 = tl.load(cu_ptr + b)
        valid = p < tl.load(cu_ptr + b + 1) - out0
        tok = tl.zeros([BLOCK], tl.int64)
        bound = tl.zeros([], tl.int64)
        for k in tl.static_range(P):
            start = tl.load(starts_ptr + k * B + b)
            n = tl.load(lens_ptr + k * B + b)
            inside = valid & (p >= bound) & (p < bound + n)
            tok = tl.where(inside, tl.load(vals_ptr + start + (p - bound), mask=inside, other=0), tok)
            if k == P - 1:
                r0 = tl.load(rcu_ptr + b)
                tl.store(ridx_ptr + r0 + (p - bound), out0 + p, mask=inside)
            bound += n
        tl.store(tok_ptr + out0 + p, tok, mask=valid)
        tl.store(pos_ptr + out0 + p, p, mask=valid)


def _cumsum0(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.numel() + 1, dtype=torch.int64, device=x.device)
    out[1:] = torch.cumsum(x, 0)
    return out


def _pack_side(pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], backend: str) -> PackedSequences:
    """pieces: (values, start [B], length [B]) in sequence order, the rollout last."""
    flat = torch.cat([v.to(torch.int64) for v, _, _ in pieces])
    bases = _cumsum0(torch.tensor([v.numel() for v, _, _ in pieces], dtype=torch.int64))[:-1].tolist()
    starts = torch.stack([s + base for (_, s, _), base in zip(pieces, bases)])  # [P, B] into `flat`
    lens = torch.stack([n for _, _, n in pieces])                               # [P, B]
    cu = _cumsum0(lens.sum(0))
    rcu = _cumsum0(lens[-1])
    total, r_total = int(cu[-1]), int(rcu[-1])
    dev = flat.device
    if backend == "triton":
        tok = torch.empty(total, dtype=torch.int64, device=dev)
        pos = torch.empty(total, dtype=torch.int64, device=dev)
        ridx = torch.empty(r_total, dtype=torch.int64, device=dev)
        nb = lens.shape[1]
        if total > 0:
            max_len = int((cu[1:] - cu[:-1]).max())
            blk = block_size(max_len, 1024)
            _pack_kernel[(triton.cdiv(max_len, blk), nb)](
                flat, starts.contiguous(), lens.contiguous(), cu, rcu, tok, pos, ridx, nb, P=len(pieces), BLOCK=blk)
    else:
        seq_len = cu[1:] - cu[:-1]
        sample = torch.repeat_interleave(torch.arange(seq_len.numel(), device=dev), seq_len)
        pos = torch.arange(total, dtype=torch.int64, device=dev) - cu[:-1][sample]
        bounds = torch.cumsum(lens, 0)                      # [P, B] exclusive piece ends
        piece = (pos[None, :] >= bounds[:, sample]).sum(0)   # index of the piece holding each position
        piece_start = (bounds - lens)[piece, sample]
        tok = flat[starts[piece, sample] + pos - piece_start]
        ridx = torch.nonzero(piece == len(pieces) - 1).flatten()  # stream order == rollout order
    return PackedSequences(tok, pos, cu.to(torch.int32), ridx)


def pack_masked_reference(*, student_prompt: Ragged, teacher_prefix: Ragged, reference: Ragged,
                          answer: Ragged, transition: Ragged, rollout: Ragged, keep: torch.Tensor,
                          backend: str = "auto") -> PackedPair:
    """Pack teacher [teacher_prefix ; reference[:keep] ; answer ; transition ; rollout] and student
    [student_prompt ; rollout] sequences of a batch into two padding-free streams (see module doc).

    All pieces are `Ragged` (or (values, offsets) tuples) over the same batch of B samples; keep [B] int64."""
    given = dict(student_prompt=student_prompt, teacher_prefix=teacher_prefix, reference=reference,
                 answer=answer, transition=transition, rollout=rollout)
    pieces = {name: Ragged(r[0], r[1].to(torch.int64)) for name, r in given.items()}
    nb = pieces["rollout"].offsets.numel() - 1
    for name, r in pieces.items():
        if r.offsets.numel() != nb + 1:
            raise ValueError(f"{name}.offsets has {r.offsets.numel()} entries, expected B+1 = {nb + 1}")
    keep = torch.as_tensor(keep, dtype=torch.int64, device=pieces["rollout"].offsets.device).reshape(-1)
    ref_len = pieces["reference"].lengths()
    if keep.numel() != nb or bool(((keep < 0) | (keep > ref_len)).any()):
        raise ValueError("keep must be [B] with 0 <= keep[b] <= len(reference[b])")
    backend = resolve_backend(backend, pieces["rollout"].values.device)

    def side(names, reference_keep=None):
        out = []
        for name in names:
            r = pieces[name]
            n = reference_keep if name == "reference" else r.lengths()
            out.append((r.values, r.offsets[:-1], n))
        prefix = torch.stack([n for _, _, n in out[:-1]]).sum(0)
        if bool(((prefix == 0) & (out[-1][2] > 0)).any()):
            raise ValueError("a rollout needs a non-empty prompt before it (next-token shift)")
        return out

    teacher = _pack_side(side(["teacher_prefix", "reference", "answer", "transition", "rollout"], keep), backend)
    student = _pack_side(side(["student_prompt", "rollout"]), backend)
    return PackedPair(teacher, student)
