"""Triton kernels of the divergence ops and their launchers (the math: `divergence`'s module doc).

Three kernels, one program per row and a loop over vocabulary blocks, all math in ACC (fp32 / fp64):
`_stats_kernel` (row max and sum-exp), `_loss_kernel` (Σ_v min(ℓ_v, c) and Σ_v G_v from the global
normaliser), `_grad_kernel` (the student-logit gradient, recomputed). Collectives between them are the
caller's (`divergence.rows_forward`); the launchers only allocate outputs and pick the launch config.
"""
from __future__ import annotations

import torch

from ._dispatch import acc_dtype, block_size, interpreting
from .divergence_spec import DivergenceSpec

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch path still works
    triton = None

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
        """The row's global normaliser (m_s, m_t, log d_s, log d_t), see `divergence.merge_stats`."""
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
    def _nearest_bf16(x):
        """fp32 x moved to the nearest bf16 value (ties to even), still fp32. The interpreter casts fp32 to bf16
        by truncation (toward zero: every stored gradient shrinks by 2^-9 on average, a bias that does not
        average out over the tokens of a weight gradient); compiled Triton rounds to nearest, and after this
        the interpreter's truncating store gives the same value."""
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _grad_kernel(s_ptr, t_ptr, g_ptr, norm_ptr, sg_ptr, scale_ptr, prm_ptr, N, V,
                     stride_s, stride_t, stride_g,
                     BLOCK_V: tl.constexpr, ACC: tl.constexpr, KIND: tl.constexpr, HAS_CLIP: tl.constexpr,
                     ROUND_BF16: tl.constexpr):
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
            if ROUND_BF16:
                g = _nearest_bf16(g)
            tl.store(g_ptr + row * stride_g + idx, g.to(g_ptr.dtype.element_ty), mask=msk)


_TL_ACC = {torch.float32: "float32", torch.float64: "float64"}


def _launch_cfg(zs: torch.Tensor, cap: int) -> dict:
    """cap: widest vocabulary block of one loop iteration (the caller's MAX_BLOCK_V*, read per call)."""
    bv = block_size(zs.shape[1], cap)
    cfg = dict(BLOCK_V=bv, ACC=getattr(tl, _TL_ACC[acc_dtype(zs.dtype)]))
    if not interpreting():
        cfg["num_warps"] = 8 if bv >= 2048 else 4
    return cfg


def launch_stats(zs: torch.Tensor, zt: torch.Tensor, spec: DivergenceSpec, cap: int) -> torch.Tensor:
    """Local stats [4, n] (raw row max, Σ exp((z − max)/T) of both logit sets), see `divergence.merge_stats`."""
    n, v = zs.shape
    acc = acc_dtype(zs.dtype)
    stats = torch.empty(4, n, dtype=acc, device=zs.device)
    _stats_kernel[(n,)](zs, zt, stats, spec.params(acc, zs.device), n, v, zs.stride(0), zt.stride(0),
                        **_launch_cfg(zs, cap))
    return stats


def launch_loss(zs: torch.Tensor, zt: torch.Tensor, norm: torch.Tensor, spec: DivergenceSpec,
                cap: int) -> torch.Tensor:
    """Local [Σ_v min(ℓ_v, c), Σ_v G_v] [2, n] from the global normaliser `norm` (contiguous)."""
    n, v = zs.shape
    acc = acc_dtype(zs.dtype)
    red = torch.empty(2, n, dtype=acc, device=zs.device)
    _loss_kernel[(n,)](zs, zt, norm, red, spec.params(acc, zs.device), n, v, zs.stride(0), zt.stride(0),
                       KIND=spec.kind, HAS_CLIP=spec.clip is not None, **_launch_cfg(zs, cap))
    return red


def launch_grad(zs, zt, norm, sg, scale, spec: DivergenceSpec, out: torch.Tensor, cap: int) -> None:
    """out = scale_n · ∂D_n/∂zs from the normaliser and ΣG (out may be zs: in place)."""
    n, v = zs.shape
    acc = acc_dtype(zs.dtype)
    _grad_kernel[(n,)](zs, zt, out, norm.contiguous(), sg.contiguous(), scale.to(acc).contiguous(),
                       spec.params(acc, zs.device), n, v, zs.stride(0), zt.stride(0), out.stride(0),
                       KIND=spec.kind, HAS_CLIP=spec.clip is not None,
                       ROUND_BF16=interpreting() and out.dtype == torch.bfloat16 and acc == torch.float32,
                       **_launch_cfg(zs, cap))
