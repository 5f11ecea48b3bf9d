"""Token-level divergences between student and teacher logits: forward KL, reverse KL, generalized JSD.

Layout (Liger/fla style): Triton kernels -> row primitives (Triton or chunked torch, same algorithm)
-> autograd.Function -> `divergence_loss`. The fused output-projection op
(`fused_linear_divergence.py`) reuses the row primitives on chunks of logits it computes itself.

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
import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._dispatch import acc_dtype, block_size, interpreting, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch path still works
    triton = None

KINDS = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
_FWD, _REV, _JSD = 0, 1, 2
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
# per iteration, not per element).
MAX_BLOCK_V = 4096
MAX_BLOCK_V_INTERPRET = 16384


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
        code = {"forward_kl": _FWD, "reverse_kl": _REV, "jsd": _JSD}[kind]
        if code == _JSD and beta == 0.0:  # TRL convention: the limits are the two KLs
            code = _FWD
        elif code == _JSD and beta == 1.0:
            code = _REV
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


# ----------------------------------------------------------------------------------------------
# Triton kernels: one program per row, a loop over vocabulary blocks, all math in ACC (fp32/fp64).
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _terms(u, lt, beta, log_b, log_1mb, clip, KIND: tl.constexpr, HAS_CLIP: tl.constexpr):
        """Per-vocab term ℓ and G = [ℓ ≤ c]·∂ℓ/∂u from student / teacher log-probs."""
        if KIND == 0:
            pt = tl.exp(lt)
            ell = pt * (lt - u)
            lp = -pt
        elif KIND == 1:
            ps = tl.exp(u)
            r = u - lt
            ell = ps * r
            lp = ps * (r + 1.0)
        else:
            a = u + log_1mb
            b = lt + log_b
            mx = tl.maximum(a, b)
            lm = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
            lp = (1.0 - beta) * tl.exp(u) * (u - lm)
            ell = beta * tl.exp(lt) * (lt - lm) + lp
        if HAS_CLIP:
            active = ell <= clip
            ell = tl.where(active, ell, clip)
            lp = tl.where(active, lp, 0.0)
        return ell, lp

    @triton.jit
    def _stats_kernel(s_ptr, t_ptr, out_ptr, prm_ptr, N, V, stride_s, stride_t,
                      BLOCK_V: tl.constexpr, ACC: tl.constexpr):
        """Online row max of the raw logits and Σ exp((z − max)/T) -> out[4, N] = (m_s, m_t, d_s, d_t)."""
        row = tl.program_id(0).to(tl.int64)
        inv_temp = tl.load(prm_ptr).to(ACC)
        offs = tl.arange(0, BLOCK_V)
        m_s = tl.full([], float("-inf"), ACC)
        m_t = tl.full([], float("-inf"), ACC)
        d_s = tl.zeros([], ACC)
        d_t = tl.zeros([], ACC)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            msk = idx < V
            s = tl.load(s_ptr + row * stride_s + idx, mask=msk, other=float("-inf")).to(ACC)
            t = tl.load(t_ptr + row * stride_t + idx, mask=msk, other=float("-inf")).to(ACC)
            ms_new = tl.maximum(m_s, tl.max(s, 0))
            mt_new = tl.maximum(m_t, tl.max(t, 0))
            d_s = d_s * tl.exp((m_s - ms_new) * inv_temp) + tl.sum(tl.exp((s - ms_new) * inv_temp), 0)
            d_t = d_t * tl.exp((m_t - mt_new) * inv_temp) + tl.sum(tl.exp((t - mt_new) * inv_temp), 0)
            m_s = ms_new
            m_t = mt_new
        tl.store(out_ptr + row, m_s)
        tl.store(out_ptr + N + row, m_t)
        tl.store(out_ptr + 2 * N + row, d_s)
        tl.store(out_ptr + 3 * N + row, d_t)

    @triton.jit
    def _load_norm(norm_ptr, row, N, ACC: tl.constexpr):
        """The row's global normaliser (m_s, m_t, log d_s, log d_t), see `merge_stats`."""
        return (tl.load(norm_ptr + row).to(ACC), tl.load(norm_ptr + N + row).to(ACC),
                tl.load(norm_ptr + 2 * N + row).to(ACC), tl.load(norm_ptr + 3 * N + row).to(ACC))

    @triton.jit
    def _log_probs(s_ptr, t_ptr, row, idx, msk, stride_s, stride_t, inv_temp, m_s, m_t, ld_s, ld_t,
                   ACC: tl.constexpr):
        """u = (z_s − m_s)/T − log d_s and the same for the teacher (masked lanes: finite junk)."""
        s = tl.load(s_ptr + row * stride_s + idx, mask=msk, other=0.0).to(ACC)
        t = tl.load(t_ptr + row * stride_t + idx, mask=msk, other=0.0).to(ACC)
        return (s - m_s) * inv_temp - ld_s, (t - m_t) * inv_temp - ld_t

    @triton.jit
    def _loss_kernel(s_ptr, t_ptr, norm_ptr, out_ptr, prm_ptr, N, V, stride_s, stride_t,
                     BLOCK_V: tl.constexpr, ACC: tl.constexpr, KIND: tl.constexpr, HAS_CLIP: tl.constexpr):
        """Local Σ_v min(ℓ_v, c) and Σ_v G_v per row -> out[2, N]."""
        row = tl.program_id(0).to(tl.int64)
        inv_temp = tl.load(prm_ptr).to(ACC)
        beta, clip = tl.load(prm_ptr + 1).to(ACC), tl.load(prm_ptr + 2).to(ACC)
        log_b, log_1mb = tl.load(prm_ptr + 3).to(ACC), tl.load(prm_ptr + 4).to(ACC)
        m_s, m_t, ld_s, ld_t = _load_norm(norm_ptr, row, N, ACC)
        offs = tl.arange(0, BLOCK_V)
        acc_l = tl.zeros([BLOCK_V], ACC)
        acc_g = tl.zeros([BLOCK_V], ACC)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            msk = idx < V
            u, lt = _log_probs(s_ptr, t_ptr, row, idx, msk, stride_s, stride_t, inv_temp, m_s, m_t, ld_s, ld_t,
                               ACC)
            ell, lp = _terms(u, lt, beta, log_b, log_1mb, clip, KIND, HAS_CLIP)
            acc_l += tl.where(msk, ell, 0.0)
            acc_g += tl.where(msk, lp, 0.0)
        tl.store(out_ptr + row, tl.sum(acc_l, 0))
        tl.store(out_ptr + N + row, tl.sum(acc_g, 0))

    @triton.jit
    def _grad_kernel(s_ptr, t_ptr, g_ptr, norm_ptr, sg_ptr, scale_ptr, prm_ptr, N, V,
                     stride_s, stride_t, stride_g,
                     BLOCK_V: tl.constexpr, ACC: tl.constexpr, KIND: tl.constexpr, HAS_CLIP: tl.constexpr):
        """d loss / d student logits = scale_n / T · (G_v − p_S,v Σ G). g_ptr may alias s_ptr."""
        row = tl.program_id(0).to(tl.int64)
        inv_temp = tl.load(prm_ptr).to(ACC)
        beta, clip = tl.load(prm_ptr + 1).to(ACC), tl.load(prm_ptr + 2).to(ACC)
        log_b, log_1mb = tl.load(prm_ptr + 3).to(ACC), tl.load(prm_ptr + 4).to(ACC)
        sg = tl.load(sg_ptr + row).to(ACC)
        scale = tl.load(scale_ptr + row).to(ACC) * inv_temp
        m_s, m_t, ld_s, ld_t = _load_norm(norm_ptr, row, N, ACC)
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            msk = idx < V
            u, lt = _log_probs(s_ptr, t_ptr, row, idx, msk, stride_s, stride_t, inv_temp, m_s, m_t, ld_s, ld_t,
                               ACC)
            _, lp = _terms(u, lt, beta, log_b, log_1mb, clip, KIND, HAS_CLIP)
            g = (lp - tl.exp(u) * sg) * scale
            tl.store(g_ptr + row * stride_g + idx, g.to(g_ptr.dtype.element_ty), mask=msk)


_TL_ACC = {torch.float32: "float32", torch.float64: "float64"}


def _launch_cfg(zs: torch.Tensor) -> dict:
    cap = MAX_BLOCK_V_INTERPRET if interpreting() else MAX_BLOCK_V
    bv = block_size(zs.shape[1], cap)
    cfg = dict(BLOCK_V=bv, ACC=getattr(tl, _TL_ACC[acc_dtype(zs.dtype)]))
    if not interpreting():
        cfg["num_warps"] = 8 if bv >= 2048 else 4
    return cfg


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
# Torch row primitives (same algorithm; blocks of rows bound the temporaries).
# ----------------------------------------------------------------------------------------------
def _t_shifted(z: torch.Tensor, m: torch.Tensor, inv_temp: float, inplace: bool = False) -> torch.Tensor:
    """(z − m[:, None]) / T in the compute dtype; reuses z's storage when allowed and already that dtype."""
    x = z if inplace and z.dtype == acc_dtype(z.dtype) else z.to(acc_dtype(z.dtype), copy=True)
    x.sub_(m[:, None].to(x.dtype))
    return x.mul_(inv_temp) if inv_temp != 1.0 else x


def _t_terms(u, lt, ps, pt, spec: DivergenceSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of the Triton `_terms` from log-probs and probabilities; may overwrite `pt` only.

    Written for few passes over memory (the CPU path is bandwidth-bound). JSD takes log m = log(β p_T +
    (1−β) p_S) directly; m is clamped at the smallest normal float, which only matters where both
    probabilities underflowed, and there every term carries a zero (or subnormal) factor p."""
    if spec.kind == _FWD:
        ell = torch.sub(lt, u).mul_(pt)
        lp = pt.neg_()
    elif spec.kind == _REV:
        r = torch.sub(u, lt)
        ell = r * ps
        lp = r.add_(1.0).mul_(ps)
    else:
        b = spec.beta
        lm = torch.lerp(ps, pt, b).clamp_min_(torch.finfo(u.dtype).tiny).log_()
        lp = torch.sub(u, lm).mul_(ps).mul_(1.0 - b)
        ell = torch.sub(lt, lm, out=lm).mul_(pt).mul_(b).add_(lp)
    if spec.clip is not None:
        inactive = ell > spec.clip
        ell.masked_fill_(inactive, spec.clip)
        lp.masked_fill_(inactive, 0.0)
    return ell, lp


def _row_max(z: torch.Tensor) -> torch.Tensor:
    """Row max in the compute dtype; -inf for an empty shard (a TP rank holding only vocab padding)."""
    if z.shape[1] == 0:
        return torch.full((z.shape[0],), float("-inf"), dtype=acc_dtype(z.dtype), device=z.device)
    return z.amax(1).to(acc_dtype(z.dtype))


def _t_grad_into(out, lp, ps, sg, scale, inv_temp, work):
    """out = scale_n / T · (lp − p_S ΣG), computed in `work` (a dead buffer, may be `out`) in two passes."""
    k = (scale.to(lp.dtype) * inv_temp)[:, None]
    g = torch.mul(lp, k, out=work).addcmul_(ps, -(sg.to(lp.dtype)[:, None] * k))
    if g is not out:
        out.copy_(g)


def _t_stats(zs, zt, inv_temp: float) -> torch.Tensor:
    """Local stats [4, n] of one block: raw row max and Σ exp((z − max)/T) of both logit sets."""
    m_s, m_t = _row_max(zs), _row_max(zt)
    d_s = torch.exp(_t_shifted(zs, m_s, inv_temp)).sum(1)
    d_t = torch.exp(_t_shifted(zt, m_t, inv_temp)).sum(1)
    return torch.stack([m_s, m_t, d_s, d_t])


def _t_block(zs, zt, spec: DivergenceSpec, scale=None, out=None, scratch=False):
    """One block of rows end to end, no process group: (D, ΣG, norm[4, n]); writes the scaled gradient
    into `out`. A single pass: the exponentials of the stats are reused as the probabilities.

    scratch: zs / zt are the caller's temporaries, so float32/64 ones serve as working buffers (no copy)."""
    inv_temp = 1.0 / spec.temperature
    m_s, m_t = _row_max(zs), _row_max(zt)
    u = _t_shifted(zs, m_s, inv_temp, scratch)
    lt = _t_shifted(zt, m_t, inv_temp, scratch)
    ps, pt = torch.exp(u), torch.exp(lt)  # unnormalised here, rescaled into probabilities below
    ld_s, ld_t = torch.log(ps.sum(1)), torch.log(pt.sum(1))
    u.sub_(ld_s[:, None])
    lt.sub_(ld_t[:, None])
    ps.mul_(torch.exp(-ld_s)[:, None])
    pt.mul_(torch.exp(-ld_t)[:, None])
    ell, lp = _t_terms(u, lt, ps, pt, spec)
    d, sg = ell.sum(1), lp.sum(1)
    if scale is not None:
        _t_grad_into(out, lp, ps, sg, scale, inv_temp, work=u)
    return d, sg, torch.stack([m_s, m_t, ld_s, ld_t])


def _t_loss_block(zs, zt, norm, spec: DivergenceSpec) -> torch.Tensor:
    """Local [Σ_v min(ℓ_v, c), Σ_v G_v] of one block from the global normaliser; inputs untouched."""
    inv_temp = 1.0 / spec.temperature
    u = _t_shifted(zs, norm[0], inv_temp).sub_(norm[2, :, None])
    lt = _t_shifted(zt, norm[1], inv_temp).sub_(norm[3, :, None])
    ell, lp = _t_terms(u, lt, torch.exp(u), torch.exp(lt), spec)
    return torch.stack([ell.sum(1), lp.sum(1)])


def _t_rows_parallel(zs, zt, spec: DivergenceSpec, group, scale, out):
    """Vocab-parallel torch path, staged like the Triton one so that a call makes exactly three
    all-reduces whatever the number of blocks: stats -> merge -> loss terms -> sum -> gradient."""
    blocks = _row_blocks(*zs.shape)
    with _row_threads():
        stats = torch.cat([_t_stats(zs[a:b], zt[a:b], 1.0 / spec.temperature) for a, b in blocks], dim=1)
    norm = merge_stats(stats, group, 1.0 / spec.temperature)
    with _row_threads():
        red = torch.cat([_t_loss_block(zs[a:b], zt[a:b], norm[:, a:b], spec) for a, b in blocks], dim=1)
    red = all_reduce_sum(red, group)
    if scale is not None:
        rows_grad(zs, zt, norm, red[1], scale, spec, "torch", out)
    return red[0], red[1], norm


def _t_grad_block(zs, zt, norm, sg, scale, spec: DivergenceSpec, out):
    inv_temp = 1.0 / spec.temperature
    u = _t_shifted(zs, norm[0], inv_temp).sub_(norm[2, :, None])
    lt = _t_shifted(zt, norm[1], inv_temp).sub_(norm[3, :, None])
    ps = torch.exp(u)
    _, lp = _t_terms(u, lt, ps, torch.exp(lt), spec)
    _t_grad_into(out, lp, ps, sg, scale, inv_temp, work=u)


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


# ----------------------------------------------------------------------------------------------
# Row primitives used by both ops: dispatch torch / Triton.
# ----------------------------------------------------------------------------------------------
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
            parts = [_t_block(zs[a:b], zt[a:b], spec, None if scale is None else scale[a:b],
                              None if out is None else out[a:b], scratch) for a, b in _row_blocks(n, v)]
        return tuple(torch.cat(p, dim=-1) for p in zip(*parts))
    cfg = _launch_cfg(zs)
    prm = spec.params(acc, zs.device)
    stats = torch.empty(4, n, dtype=acc, device=zs.device)
    _stats_kernel[(n,)](zs, zt, stats, prm, n, v, zs.stride(0), zt.stride(0), **cfg)
    norm = merge_stats(stats, group, 1.0 / spec.temperature).contiguous()
    red = torch.empty(2, n, dtype=acc, device=zs.device)
    kw = dict(KIND=spec.kind, HAS_CLIP=spec.clip is not None, **cfg)
    _loss_kernel[(n,)](zs, zt, norm, red, prm, n, v, zs.stride(0), zt.stride(0), **kw)
    red = all_reduce_sum(red, group)
    if scale is not None:
        _launch_grad(zs, zt, norm, red[1], scale, spec, out)
    return red[0], red[1], norm


def _launch_grad(zs, zt, norm, sg, scale, spec, out):
    n, v = zs.shape
    acc = acc_dtype(zs.dtype)
    cfg = _launch_cfg(zs)
    _grad_kernel[(n,)](zs, zt, out, norm.contiguous(), sg.contiguous(), scale.to(acc).contiguous(),
                       spec.params(acc, zs.device), n, v, zs.stride(0), zt.stride(0), out.stride(0),
                       KIND=spec.kind, HAS_CLIP=spec.clip is not None, **cfg)


def rows_grad(zs, zt, norm, sg, scale, spec: DivergenceSpec, backend: str, out):
    """Recompute scale_n · ∂D_n/∂zs from the saved normaliser and ΣG; purely local (no collectives)."""
    n, v = zs.shape
    if n == 0:
        return out
    if backend == "torch":
        with _row_threads():
            for a, b in _row_blocks(n, v):
                _t_grad_block(zs[a:b], zt[a:b], norm[:, a:b], sg[a:b], scale[a:b], spec, out[a:b])
    else:
        _launch_grad(zs, zt, norm, sg, scale, spec, out)
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
