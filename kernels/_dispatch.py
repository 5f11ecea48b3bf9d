"""Backend choice shared by the kernels: compiled Triton on CUDA, chunked torch on CPU.

Every op takes `backend="auto" | "triton" | "torch"`:

* ``auto``   -> Triton when the tensors live on CUDA, torch otherwise.
* ``triton`` -> always the Triton kernels. On CPU this only works under the Triton interpreter
  (``TRITON_INTERPRET=1`` set before this package is imported, see docs/PLATFORM.md, Triton); the
  tests use it to run the kernels on small shapes.
* ``torch``  -> the chunked pure-torch path (same algorithm and memory bound as the kernels).

The environment variable ``ATESD_KERNEL_BACKEND`` (``auto`` | ``triton`` | ``torch``, read at every
call) replaces ``auto`` when set; an explicit ``triton``/``torch`` argument still wins, so that the
kernel tests can compare the two paths under any setting. Every kernel call inside atesd_mc (the
losses, the teacher / student packing) passes ``auto``, so the variable forces a whole training run
onto one backend: torch on a GPU for an A/B against the kernels, or, with ``TRITON_INTERPRET=1``,
the GPU code path on CPU (tests/test_triton_path.py; docs/PLATFORM.md, Triton).
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (read at launch, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map the user's backend choice and the tensors' device to "triton" or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("ATESD_KERNEL_BACKEND") or "auto"  # set but empty: unset
        if backend not in BACKENDS:
            raise ValueError(f"ATESD_KERNEL_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "torch"
    if backend == "triton":
        if not triton_importable():
            raise RuntimeError("backend='triton' but triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                "backend='triton' on a non-CUDA tensor needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before importing atesd_mc.kernels (or use backend='torch')")
    return backend


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_size(n: int, cap: int, floor: int = 16) -> int:
    """Power-of-two block covering n, clamped to [floor, cap]."""
    return max(floor, min(cap, next_pow2(n)))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype: float64 stays float64 (test oracles), everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
