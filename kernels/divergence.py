"""Token-level divergences between student and teacher logits: forward KL, reverse KL, generalized JSD.

Layout (Liger/fla style): Triton kernels (`divergence_triton.py`) and their chunked torch twin
(`divergence_torch.py`, same algorithm) -> row primitives here (`rows_forward` / `rows_grad`: backend
dispatch, row blocks, collectives) -> autograd.Function -> `divergence_loss`. Options are validated into
a `DivergenceSpec` (`divergence_spec.py`). The fused output-projection op (`fused_linear_divergence.py`)
reuses the row primitives on chunks of logits it computes itself.

Math, per token n (s = student logits / T, t = teacher logits / T, u = log p_S, lt = log p_T):

* every kind is a sum of per-vocabulary terms ℓ_v(u_v, lt_v); the clipped loss is D = Σ_v min(ℓ_v, c).
* gradient: with ℓ'_v = ∂ℓ_v/∂u_v, a_v = [ℓ_v ≤ c], G_v = a_v ℓ'_v and ∂u_v/∂s_j = δ_vj − p_S,j,
      ∂D/∂s_j = G_j − p_S,j · Σ_v G_v,
  so a row needs only its two log-normalisers and Σ_v G_v: the forward keeps those O(N) numbers and the
  backward recomputes G from the logits instead of holding an [N, V] gradient. Log-probs are formed as
  (z − max z)/T − log Σ exp((z − max z)/T), which keeps fp32 accurate for logits of ±1e4.
  forward KL: ℓ = p_T (lt − u), ℓ' = −p_T.   reverse KL: ℓ = p_S (u − lt), ℓ' = p_S (u − lt + 1).
  JSD: log m = logaddexp(log β + lt, log(1−β) + u), ℓ = β p_T (lt − log m) + (1−β) p_S (u − log m),
  ℓ' = (1−β) p_S (u − log m) (the terms through m cancel).
* vocab parallel: a shard sees V_local columns. Row max and sum-exp are all-reduced (MAX then SUM,
  the two logit sets stacked into one tensor each time), then Σ_v ℓ and Σ_v G are all-reduced
  together: three all-reduces per forward (per chunk in the fused op), none in the backward.
  Per-vocabulary work (clip, the JSD mixture) only needs the global normalisers, so it stays local
  and the result equals the unsplit computation.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from . import divergence_torch as tch
from . import divergence_triton as trt
from ._dispatch import acc_dtype, interpreting, resolve_backend
from .divergence_spec import KINDS, REDUCTIONS, DivergenceSpec

__all__ = ["KINDS", "REDUCTIONS", "DivergenceSpec", "divergence_loss", "rows_forward", "rows_grad",
           "merge_stats", "all_reduce_sum", "token_weights", "reduction_scale", "reduce_rows", "check_common"]

# Rows per torch block: the CPU path works on [rows, V] float32 temporaries of about this many elements
# (4 MiB each: the ~8 live ones stay in the L3 cache across the ~25 elementwise passes, and glibc recycles
# them instead of mmap/munmap + page faults on every call). On one thread, the row-wise work on
# 110 x 151,936 logits took about 2x longer with 2^21-element blocks than with 2^18-2^20.
TORCH_BLOCK_ELEMS = 1 << 20
# Intra-op threads for the torch row-wise work (None: leave torch's setting alone). Blocks this small are
# faster on one thread: with two, every one of the ~25 ops per block ends at an OpenMP barrier, and on a
# shared, loaded machine a descheduled sibling thread stalls each barrier. Measured on the 2-core dev box
# (load ~4, 110 x 151,936 logits, p50 of 4): 0.13-0.23 s on one thread vs 0.5-1.5 s on two. The matmuls
# of the fused op run outside this region with all threads.
TORCH_ROW_THREADS: int | None = 1
# Widest vocabulary block of one Triton loop iteration (compiled / interpreted: the interpreter pays
# per iteration, not per element). Read at every launch (`_block_cap`), so setting them here takes effect.
MAX_BLOCK_V = 4096
MAX_BLOCK_V_INTERPRET = 16384


# ----------------------------------------------------------------------------------------------
# Collectives (no-ops without a group of size > 1).
# ----------------------------------------------------------------------------------------------
def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def merge_stats(stats: torch.Tensor, group, inv_temp: float) -> torch.Tensor:
    """Local stats [4, n] (raw max, Σ exp((z − max)/T)) of both logit sets -> global normaliser [4, n]
    (m_s, m_t, log d_s, log d_t), so that log p = (z − m)/T − log d. Two all-reduces (MAX, SUM).

    Keeping the raw max apart from log d (instead of one lse) matters for large logits: z − m is exact
    for the logits near the max, so fp32 log-probs of ±1e4 logits keep their relative accuracy."""
    m, d = stats[:2], stats[2:]
    if _world(group) > 1:
        m_g = m.clone()
        dist.all_reduce(m_g, op=dist.ReduceOp.MAX, group=group)
        d = d * torch.exp((m - m_g) * inv_temp)
        dist.all_reduce(d, op=dist.ReduceOp.SUM, group=group)
        m = m_g
    return torch.cat([m, torch.log(d)])


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


# ----------------------------------------------------------------------------------------------
# Torch row blocks: bounded temporaries, own thread setting, staged collectives.
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _row_threads():
    """Run the enclosed torch row-wise work on TORCH_ROW_THREADS intra-op threads (see there)."""
    old = torch.get_num_threads()
    if TORCH_ROW_THREADS is None or old == TORCH_ROW_THREADS:
        yield
        return
    torch.set_num_threads(TORCH_ROW_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _row_blocks(n: int, v: int):
    rows = max(1, TORCH_BLOCK_ELEMS // max(1, v))
    return [(i, min(n, i + rows)) for i in range(0, n, rows)]


def _t_rows_parallel(zs, zt, spec: DivergenceSpec, group, scale, out):
    """Vocab-parallel torch path, staged like the Triton one so that a call makes exactly three
    all-reduces whatever the number of blocks: stats -> merge -> loss terms -> sum -> gradient."""
    blocks = _row_blocks(*zs.shape)
    inv_temp = 1.0 / spec.temperature
    with _row_threads():
        stats = torch.cat([tch.block_stats(zs[a:b], zt[a:b], inv_temp) for a, b in blocks], dim=1)
    norm = merge_stats(stats, group, inv_temp)
    with _row_threads():
        red = torch.cat([tch.block_loss(zs[a:b], zt[a:b], norm[:, a:b], spec) for a, b in blocks], dim=1)
    red = all_reduce_sum(red, group)
    if scale is not None:
        rows_grad(zs, zt, norm, red[1], scale, spec, "torch", out)
    return red[0], red[1], norm


# ----------------------------------------------------------------------------------------------
# Row primitives used by both ops: dispatch torch / Triton.
# ----------------------------------------------------------------------------------------------
def _block_cap() -> int:
    """Widest Triton vocabulary block, read per launch (tests shrink MAX_BLOCK_V_INTERPRET)."""
    return MAX_BLOCK_V_INTERPRET if interpreting() else MAX_BLOCK_V


def rows_forward(zs, zt, spec: DivergenceSpec, group, backend: str, scale=None, out=None, scratch=False):
    """Per-row D (clipped, summed over the full vocabulary), ΣG and the normaliser [4, n] (see
    `merge_stats`) for logits [n, V_local].

    With `scale` [n], also writes scale_n · ∂D_n/∂zs into `out` (may be `zs` itself: in place).
    scratch: the caller no longer needs zs / zt, the torch path may overwrite them (the fused op's chunks)."""
    n, v = zs.shape
    acc = acc_dtype(zs.dtype)
    if n == 0:
        empty = torch.zeros(0, dtype=acc, device=zs.device)
        return empty, empty, torch.zeros(4, 0, dtype=acc, device=zs.device)
    if backend == "torch" and _world(group) > 1:
        return _t_rows_parallel(zs, zt, spec, group, scale, out)
    if backend == "torch":
        with _row_threads():
            parts = [tch.block_forward(zs[a:b], zt[a:b], spec, None if scale is None else scale[a:b],
                                       None if out is None else out[a:b], scratch) for a, b in _row_blocks(n, v)]
        return tuple(torch.cat(p, dim=-1) for p in zip(*parts))
    stats = trt.launch_stats(zs, zt, spec, _block_cap())
    norm = merge_stats(stats, group, 1.0 / spec.temperature).contiguous()
    red = all_reduce_sum(trt.launch_loss(zs, zt, norm, spec, _block_cap()), group)
    if scale is not None:
        trt.launch_grad(zs, zt, norm, red[1], scale, spec, out, _block_cap())
    return red[0], red[1], norm


def rows_grad(zs, zt, norm, sg, scale, spec: DivergenceSpec, backend: str, out):
    """Recompute scale_n · ∂D_n/∂zs from the saved normaliser and ΣG; purely local (no collectives)."""
    n, v = zs.shape
    if n == 0:
        return out
    if backend == "torch":
        with _row_threads():
            for a, b in _row_blocks(n, v):
                tch.block_grad(zs[a:b], zt[a:b], norm[:, a:b], sg[a:b], scale[a:b], spec, out[a:b])
    else:
        trt.launch_grad(zs, zt, norm, sg, scale, spec, out, _block_cap())
    return out


# ----------------------------------------------------------------------------------------------
# Token weighting and reduction.
# ----------------------------------------------------------------------------------------------
def token_weights(n: int, mask, weights, dtype, device) -> torch.Tensor:
    """w_n = weights_n (or 1) on unmasked tokens, 0 on masked ones."""
    w = torch.ones(n, dtype=dtype, device=device) if weights is None else weights.reshape(n).to(dtype)
    if mask is not None:
        w = torch.where(mask.reshape(n).to(torch.bool), w, torch.zeros((), dtype=dtype, device=device))
    return w


def reduction_scale(w: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-token factor c_n with loss = Σ_n c_n D_n (sum: w_n; mean: w_n / Σ w, or 0 when Σ w = 0)."""
    if reduction != "mean":
        return w
    denom = w.sum()
    nz = denom != 0
    return torch.where(nz, w / torch.where(nz, denom, torch.ones_like(denom)), torch.zeros_like(w))


def reduce_rows(d: torch.Tensor, w: torch.Tensor, reduction: str) -> torch.Tensor:
    """Weighted reduction; masked / zero-weight rows contribute exactly 0 (never NaN)."""
    wd = torch.where(w != 0, d * w, torch.zeros_like(d))
    if reduction == "none":
        return wd
    c = reduction_scale(w, reduction)
    return torch.where(c != 0, d * c, torch.zeros_like(d)).sum()


def check_common(reduction: str, teacher: tuple, backend: str, device) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, x in teacher:
        if x is not None and x.requires_grad:
            raise ValueError(f"{name} requires grad: teacher tensors must be detached (gradient flows "
                             f"into the student only); pass {name}.detach()")
    return resolve_backend(backend, device)


# ----------------------------------------------------------------------------------------------
# autograd.Function and functional API.
# ----------------------------------------------------------------------------------------------
class _DivergenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, zt, w, spec, reduction, group, backend):
        d, sg, norm = rows_forward(zs, zt, spec, group, backend)
        ctx.save_for_backward(zs, zt, norm, sg, w)
        ctx.spec, ctx.reduction, ctx.backend = spec, reduction, backend
        return reduce_rows(d, w, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        zs, zt, norm, sg, w = ctx.saved_tensors
        scale = reduction_scale(w, ctx.reduction) * grad_out.to(w.dtype)  # [N] * scalar or [N]
        grad = rows_grad(zs, zt, norm, sg, scale, ctx.spec, ctx.backend, torch.empty_like(zs))
        return grad, None, None, None, None, None, None


def divergence_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: str = "forward_kl",
                    beta: float = 0.5, temperature: float = 1.0, clip: float | None = None,
                    mask: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                    reduction: str = "mean", process_group=None, backend: str = "auto") -> torch.Tensor:
    """Divergence between student and teacher token distributions over logits [..., V_local].

    kind: "forward_kl" Σ p_T(log p_T − log p_S) | "reverse_kl" Σ p_S(log p_S − log p_T) |
    "jsd" β KL(p_T‖m) + (1−β) KL(p_S‖m), m = β p_T + (1−β) p_S (beta 0 / 1 give forward / reverse KL).
    Both logit sets are divided by `temperature`. `clip`=c caps each per-vocabulary term at c before the
    sum over the vocabulary (clipped terms get no gradient). `mask` [...] (bool) drops tokens,
    `weights` [...] scales each token's divergence. reduction "sum" Σ w_n D_n, "mean" that / Σ w_n over
    unmasked tokens (0 if there are none), "none" per-token w_n D_n (masked tokens 0).
    With `process_group`, the last dimension is this rank's shard of a vocabulary split over the group;
    every rank gets the unsplit result. Gradient flows into `student_logits` only; a teacher that requires
    grad raises ValueError. The loss is float32 (float64 for float64 logits).
    backend: "auto" (Triton on CUDA, chunked torch otherwise) | "triton" | "torch".
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    backend = check_common(reduction, (("teacher_logits", teacher_logits),), backend, student_logits.device)
    spec = DivergenceSpec.make(kind, beta, temperature, clip)
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    n = lead.numel()  # not reshape(-1, v): ambiguous for a shard with no vocabulary (v = 0)
    zs = student_logits.reshape(n, v)
    zt = teacher_logits.reshape(n, v)
    zs = zs if zs.stride(-1) == 1 else zs.contiguous()
    zt = zt if zt.stride(-1) == 1 else zt.contiguous()
    w = token_weights(zs.shape[0], mask, weights, acc_dtype(zs.dtype), zs.device)
    out = _DivergenceFunction.apply(zs, zt, w, spec, reduction, process_group, backend)
    return out.reshape(lead) if reduction == "none" else out
