"""Chunked pure-torch twin of the divergence kernels (the math: `divergence`'s module doc).

The same algorithm as `divergence_triton`, one block of rows at a time; `divergence.rows_forward` /
`rows_grad` cut the rows into blocks (bounding the [rows, V] temporaries), pick the intra-op threads
and run the collectives between the stages.
"""
from __future__ import annotations

import torch

from ._dispatch import acc_dtype
from .divergence_spec import FORWARD_KL, REVERSE_KL, DivergenceSpec


def _shifted(z: torch.Tensor, m: torch.Tensor, inv_temp: float, inplace: bool = False) -> torch.Tensor:
    """(z − m[:, None]) / T in the compute dtype; reuses z's storage when allowed and already that dtype."""
    x = z if inplace and z.dtype == acc_dtype(z.dtype) else z.to(acc_dtype(z.dtype), copy=True)
    x.sub_(m[:, None].to(x.dtype))
    return x.mul_(inv_temp) if inv_temp != 1.0 else x


def _terms(u, lt, ps, pt, spec: DivergenceSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `divergence_triton._terms` from log-probs and probabilities; may overwrite `pt` only.

    Written for few passes over memory (the CPU path is bandwidth-bound). JSD takes log m = log(β p_T +
    (1−β) p_S) directly; m is clamped at the smallest normal float, which only matters where both
    probabilities underflowed, and there every term carries a zero (or subnormal) factor p."""
    if spec.kind == FORWARD_KL:
        ell = torch.sub(lt, u).mul_(pt)
        lp = pt.neg_()
    elif spec.kind == REVERSE_KL:
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


def _grad_into(out, lp, ps, sg, scale, inv_temp, work):
    """out = scale_n / T · (lp − p_S ΣG), computed in `work` (a dead buffer, may be `out`) in two passes."""
    k = (scale.to(lp.dtype) * inv_temp)[:, None]
    g = torch.mul(lp, k, out=work).addcmul_(ps, -(sg.to(lp.dtype)[:, None] * k))
    if g is not out:
        out.copy_(g)


def block_stats(zs, zt, inv_temp: float) -> torch.Tensor:
    """Local stats [4, n] of one block: raw row max and Σ exp((z − max)/T) of both logit sets."""
    m_s, m_t = _row_max(zs), _row_max(zt)
    d_s = torch.exp(_shifted(zs, m_s, inv_temp)).sum(1)
    d_t = torch.exp(_shifted(zt, m_t, inv_temp)).sum(1)
    return torch.stack([m_s, m_t, d_s, d_t])


def block_forward(zs, zt, spec: DivergenceSpec, scale=None, out=None, scratch=False):
    """One block of rows end to end, no process group: (D, ΣG, norm[4, n]); writes the scaled gradient
    into `out`. A single pass: the exponentials of the stats are reused as the probabilities.

    scratch: zs / zt are the caller's temporaries, so float32/64 ones serve as working buffers (no copy)."""
    inv_temp = 1.0 / spec.temperature
    m_s, m_t = _row_max(zs), _row_max(zt)
    u = _shifted(zs, m_s, inv_temp, scratch)
    lt = _shifted(zt, m_t, inv_temp, scratch)
    ps, pt = torch.exp(u), torch.exp(lt)  # unnormalised here, rescaled into probabilities below
    ld_s, ld_t = torch.log(ps.sum(1)), torch.log(pt.sum(1))
    u.sub_(ld_s[:, None])
    lt.sub_(ld_t[:, None])
    ps.mul_(torch.exp(-ld_s)[:, None])
    pt.mul_(torch.exp(-ld_t)[:, None])
    ell, lp = _terms(u, lt, ps, pt, spec)
    d, sg = ell.sum(1), lp.sum(1)
    if scale is not None:
        _grad_into(out, lp, ps, sg, scale, inv_temp, work=u)
    return d, sg, torch.stack([m_s, m_t, ld_s, ld_t])


def block_loss(zs, zt, norm, spec: DivergenceSpec) -> torch.Tensor:
    """Local [Σ_v min(ℓ_v, c), Σ_v G_v] of one block from the global normaliser; inputs untouched."""
    inv_temp = 1.0 / spec.temperature
    u = _shifted(zs, norm[0], inv_temp).sub_(norm[2, :, None])
    lt = _shifted(zt, norm[1], inv_temp).sub_(norm[3, :, None])
    ell, lp = _terms(u, lt, torch.exp(u), torch.exp(lt), spec)
    return torch.stack([ell.sum(1), lp.sum(1)])


def block_grad(zs, zt, norm, sg, scale, spec: DivergenceSpec, out) -> None:
    """Writes scale_n · ∂D_n/∂zs of one block into `out`, recomputed from the normaliser and ΣG."""
    inv_temp = 1.0 / spec.temperature
    u = _shifted(zs, norm[0], inv_temp).sub_(norm[2, :, None])
    lt = _shifted(zt, norm[1], inv_temp).sub_(norm[3, :, None])
    ps = torch.exp(u)
    _, lp = _terms(u, lt, ps, torch.exp(lt), spec)
    _grad_into(out, lp, ps, sg, scale, inv_temp, work=u)
