"""Validated options of the divergence ops, shared by the Triton kernels, the torch twin and the ops.

Its own module so that `divergence_torch` / `divergence_triton` (imported by `divergence`) can take a
spec without importing `divergence` back.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
# Effective kind codes: the Triton kernels' KIND constexpr branches on these values (0, 1, 2).
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2


@dataclass(frozen=True)
class DivergenceSpec:
    """Validated options. `kind` is the effective code: jsd with beta 0 / 1 becomes forward / reverse KL."""
    kind: int
    beta: float
    temperature: float
    clip: float | None

    @classmethod
    def make(cls, kind: str, beta: float, temperature: float, clip: float | None) -> "DivergenceSpec":
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if not float(temperature) > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        code = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "jsd": JSD}[kind]
        if code == JSD and beta == 0.0:  # TRL convention: the limits are the two KLs
            code = FORWARD_KL
        elif code == JSD and beta == 1.0:
            code = REVERSE_KL
        return cls(code, float(beta), float(temperature), None if clip is None else float(clip))

    def params(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Kernel scalars (1/T, β, c, log β, log(1−β)) as a tensor in the compute dtype: float kernel
        arguments would round float64 runs to fp32. Cached, so chunk loops don't copy host->device."""
        return _params(self, dtype, device)


@functools.lru_cache(maxsize=256)
def _params(spec: DivergenceSpec, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    b = spec.beta
    vals = [1.0 / spec.temperature, b, 0.0 if spec.clip is None else spec.clip,
            math.log(b) if b > 0 else float("-inf"), math.log1p(-b) if b < 1 else float("-inf")]
    return torch.tensor(vals, dtype=dtype, device=device)
