"""Which layers run each kind of pass, decided once at start-up and read by every stage.

Two engines compute the same Qwen3 math on the same weights:
* lean: atesd_mc/model/lean.py, plain torch on a rank that holds the whole model (KV-cached decode,
  padding-free full-sequence passes);
* megatron: megatron-core's layers (transformer-engine's on GPUs that have it), any TP/PP layout.

Two kinds of pass:
* decode: rollouts and evaluation sampling (`--inference-engine auto|megatron`);
* forward: every full-sequence pass, with or without a backward: the student's forward and
  backward, the teacher's forward, the probe NLL, the teacher score, SFT, GRPO and the warm start
  (`--train-engine auto|lean|megatron`). The teacher and the student always share it, so the
  teacher-student mismatch the controller reads holds no engine difference.

auto: decode lean wherever the model allows it; forward lean on CPU (measured 1.6x faster there,
BENCHMARKS.md) and megatron's layers on GPU (transformer-engine kernels) until a GPU measurement
says otherwise. A model the lean path does not implement (model/lean.py `unsupported`) runs on
megatron's layers whatever was asked, and `describe` says why."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Engine:
    decode: str
    """'lean' or 'megatron': rollouts and evaluation sampling."""
    forward: str
    """'lean' or 'megatron': every full-sequence pass (student, teacher, probe, SFT, GRPO, warm start)."""
    lean_unsupported: str | None = None
    """Why the lean path cannot run this model (None when it can)."""

    @property
    def lean_decode(self) -> bool:
        return self.decode == "lean"

    @property
    def lean_forward(self) -> bool:
        return self.forward == "lean"

    def describe(self) -> str:
        """One log line: what runs where, and why megatron's layers where lean was possible."""
        text = f"engine: decode {self.decode}, forward/backward {self.forward}"
        if self.lean_unsupported:
            text += f" (the lean path does not implement {self.lean_unsupported})"
        return text


def resolve(inference_engine: str, train_engine: str, model) -> Engine:
    """The engine for `model` (an unwrapped GPTModel stage) under the two config switches."""
    from atesd_mc.model.lean import unsupported

    reason = unsupported(model)
    decode = "lean" if inference_engine == "auto" and reason is None else "megatron"
    wants_lean = train_engine == "lean" or (train_engine == "auto" and not torch.cuda.is_available())
    forward = "lean" if wants_lean and reason is None else "megatron"
    return Engine(decode=decode, forward=forward, lean_unsupported=reason)


MEGATRON = Engine(decode="megatron", forward="megatron")
"""Megatron's layers for everything (a model built outside the trainer, e.g. in a converter)."""
