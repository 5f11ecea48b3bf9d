"""Right-padded model inputs built from packed teacher/student streams.

The pack kernel (atesd_mc.kernels.pack_masked_reference) writes padding-free streams; megatron's
local attention takes [b, s] batches, so each stream is unpacked into right-padded rows (causal
attention keeps padding from reaching real tokens, so no mask is needed). Rollout positions are
returned as flat indices into the model's [s, b, h] hidden states, shifted by one so position i
holds the hidden state that predicts rollout token i.

Packing and unpacking run on the model's device with the kernels' `auto` backend: the Triton kernel
on CUDA, the torch path on CPU (ATESD_KERNEL_BACKEND forces either, kernels/_dispatch.py). On CUDA
the pieces go over as small int64 vectors and the padded rows are built there; only the row lengths
come back to the host (SideBatch keeps them on the CPU)."""
from __future__ import annotations

import dataclasses

import torch

from atesd_mc.kernels import Ragged, pack_masked_reference, reveal_lengths


@dataclasses.dataclass(kw_only=True, slots=True)
class SideBatch:
    tokens: torch.Tensor
    """[b, s] right-padded token ids."""
    predict_index: torch.Tensor
    """[R] flat index into hidden.view(s*b, h) of the state predicting each rollout token."""
    lengths: torch.Tensor
    """[b] real (unpadded) tokens per row; padding is id 0, which may also be a real token."""


@dataclasses.dataclass(kw_only=True, slots=True)
class PairBatch:
    student: SideBatch
    teacher: SideBatch
    rollout_ids: torch.Tensor
    """[R] the rollout tokens (targets), sample-major."""
    rollout_lengths: torch.Tensor
    """[b] tokens per rollout."""


def _unpack(packed) -> SideBatch:
    """Right-padded rows on the stream's own device; the lengths come back to the host."""
    cu = packed.cu_seqlens.long()
    dev = cu.device
    lens = cu[1:] - cu[:-1]
    host_lens = lens.cpu()
    b, s = len(host_lens), int(host_lens.max()) if len(host_lens) else 0
    tokens = torch.zeros(b, max(s, 1), dtype=torch.long, device=dev)
    row = torch.repeat_interleave(torch.arange(b, device=dev), lens, output_size=packed.tokens.numel())
    tokens[row, packed.positions] = packed.tokens
    r_row = torch.searchsorted(cu, packed.rollout_index, right=True) - 1
    r_col = packed.rollout_index - cu[r_row] - 1  # the position that predicts the token
    return SideBatch(tokens=tokens, predict_index=r_col * b + r_row, lengths=host_lens)


def build_pair(examples, responses: list[list[int]], alpha: float, unit: str,
               device) -> PairBatch:
    """Teacher [prefix ; reference[:keep(alpha)] ; answer ; transition ; response] and student
    [prompt ; response] for a list of store Examples and their responses (rollouts or references),
    packed on `device` (see the module doc)."""
    t = [ex.teacher for ex in examples]
    seg_ends = Ragged.from_lists([p.segment_ends.tolist() for p in t])
    keep = reveal_lengths(seg_ends, alpha, unit=unit)  # host: a few numbers per sample

    def ragged(seqs):
        return Ragged.from_lists(seqs, device)

    rollout = ragged(responses)
    pair = pack_masked_reference(
        student_prompt=ragged([ex.student.tolist() for ex in examples]),
        teacher_prefix=ragged([p.prefix.tolist() for p in t]),
        reference=ragged([p.reference.tolist() for p in t]),
        answer=ragged([p.answer.tolist() for p in t]),
        transition=ragged([p.transition.tolist() for p in t]),
        rollout=rollout, keep=keep, backend="auto")
    return PairBatch(student=_unpack(pair.student), teacher=_unpack(pair.teacher),
                     rollout_ids=rollout.values, rollout_lengths=rollout.lengths())


def build_side(prompts: list[list[int]], responses: list[list[int]], device) -> tuple[SideBatch, torch.Tensor]:
    """[prompt ; response] rows (SFT, probe NLL): the batch and the response ids [R]."""
    b = len(prompts)
    rows = [p + r for p, r in zip(prompts, responses)]
    s = max(len(x) for x in rows)
    tokens = torch.zeros(b, s, dtype=torch.long)
    idx = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        idx.extend((len(p) - 1 + j) * b + i for j in range(len(r)))
    ids = torch.tensor([t for r in responses for t in r], dtype=torch.long)
    return SideBatch(tokens=tokens.to(device), predict_index=torch.tensor(idx, dtype=torch.long, device=device),
                     lengths=torch.tensor([len(x) for x in rows])), ids.to(device)


def per_sequence_weights(lengths: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Token weights 1/(|y_i| * num_sequences): the loss is a mean over sequences of per-sequence
    token means (docs/METHOD.md, Loss). Empty sequences contribute nothing."""
    lengths = lengths.long()
    per_tok = torch.where(lengths > 0, 1.0 / (lengths.clamp(min=1).double() * num_sequences),
                          torch.zeros_like(lengths, dtype=torch.float64))
    return torch.repeat_interleave(per_tok, lengths).float()
