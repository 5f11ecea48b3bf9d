"""Output projection fused with the distillation divergence: never materialises [N, V] logits.

Algorithm (one pass over token chunks; Liger's fused-linear pattern):

    for each chunk of c tokens:
        zs = h_s[chunk] @ W^T, zt = h_t[chunk] @ W_t^T            # [c, V_local], torch matmul (cuBLAS / CPU BLAS)
        row primitives (divergence.rows_forward): log-sum-exps (all-reduced across the vocab group),
            per-token divergence, and d loss_n / d zs written in place over zs
        grad_hidden[chunk] = dzs @ W ; grad_weight += dzs^T @ h_s[chunk]   (fp32 sum for bf16, see _add_wgrad)

so only grad_hidden [N, H], grad_weight [V_local, H], O(N) per-token numbers and one chunk of logits
exist at a time: extra memory O(c · V_local), independent of N. The backward only multiplies the stored
gradients by grad_output. For reduction="none" grad_output differs per token and cannot be folded into
grad_weight after the fact, so the forward stores nothing and the backward reruns the loop (twice the
matmuls; training uses "mean"/"sum").

Why token chunks over the full local vocabulary and no vocab tiling: the gradient of every logit needs
the row's global log-sum-exp, so tiling the vocabulary would require a second matmul pass; with c ≥ 16
rows the chunk is already small (and with tensor parallelism V_local = V / tp).

Vocab parallel (process_group): `weight` is this rank's [V_local, H] shard, hidden states are replicated.
The loss equals the unsplit one on every rank; grad_weight is this shard's gradient; grad_hidden is this
shard's *partial* contribution, to be summed over the group - exactly what megatron's
copy_to_tensor_model_parallel_region (or the sequence-parallel gather) does in its backward, as for its
own output layer.
"""
from __future__ import annotations

import torch

from ._dispatch import acc_dtype
from .divergence import (DivergenceSpec, check_common, reduce_rows, reduction_scale,
                         rows_forward, token_weights)

# Logits per token chunk. CPU: 2^24 (64 MiB fp32; about 110 tokens at V = 151,936). A chunk's matmuls stream
# the whole [V_local, H] weight from memory, so chunks of fewer than ~100 tokens leave CPU BLAS memory-bound
# (31 GFLOP/s at 13 rows vs 115 at 256 on the 2-core dev machine); the row-wise work inside a chunk runs in
# blocks of divergence.TORCH_BLOCK_ELEMS, so the chunk's two logit buffers dominate the extra memory.
# CUDA: 2^25 logits, rows a power of two (>= 16).
TORCH_CHUNK_ELEMS = 1 << 24
CUDA_CHUNK_ELEMS = 1 << 25
# bf16 / fp16 weights: the weight gradient is summed over chunks in fp32 (see `_add_wgrad`), each chunk's
# product going through a [rows, H] fp32 temporary of at most this many elements (64 MiB), so that the
# temporary stays bounded whatever the vocabulary.
WGRAD_SLICE_ELEMS = 1 << 24
# cuBLAS GEMM with bf16 / fp16 inputs and an fp32 output (torch.mm(..., out_dtype=torch.float32), aten::mm.dtype_out;
# older torch lacks it and upcasts instead): the chunk's product never passes through the input dtype.
_MM_FP32_OUT = "dtype_out" in torch.ops.aten.mm.overloads()


def default_chunk(n: int, v: int, backend: str) -> int:
    if backend == "torch":
        rows = max(16, TORCH_CHUNK_ELEMS // max(1, v))
    else:
        rows = 1 << max(4, (CUDA_CHUNK_ELEMS // max(1, v)).bit_length() - 1)
    return max(1, min(n, rows))


def _add_wgrad(gw, dz, h, tmp):
    """gw += dz^T @ h for one chunk, gw in the accumulation dtype (fp32 / fp64).

    fp32 / fp64 inputs: one GEMM into gw, as always. bf16 / fp16: summing the chunks' products in the input
    dtype rounds the running sum at every chunk, so its error grows with the number of chunks (2e-2 relative
    after 256 bf16 chunks); here each product is formed in fp32 (cuBLAS: bf16 inputs, fp32 output; CPU: the
    operands upcast, bf16 x bf16 products are exact in fp32), a vocabulary slice at a time through `tmp`
    [rows, H], and added to gw; the caller casts gw to the weight dtype once, at the end."""
    if dz.dtype == gw.dtype:
        gw.addmm_(dz.t(), h)
        return
    fp32_out = tmp.is_cuda and _MM_FP32_OUT
    if not fp32_out:
        h = h.to(gw.dtype)
    for v0 in range(0, dz.shape[1], tmp.shape[0]):
        v1 = min(dz.shape[1], v0 + tmp.shape[0])
        part = tmp[:v1 - v0]
        if fp32_out:
            torch.mm(dz[:, v0:v1].t(), h, out_dtype=gw.dtype, out=part)
        else:
            torch.mm(dz[:, v0:v1].t().to(gw.dtype), h, out=part)
        gw[v0:v1].add_(part)


def _wgrad_buffers(w_s):
    """Zeroed accumulator for the weight gradient in the accumulation dtype, and `_add_wgrad`'s temporary.

    Memory: for bf16 / fp16 weights the accumulator is fp32, twice the weight (this rank's [V_local, H] shard
    under tensor parallelism): what megatron's fp32 main_grad holds anyway. At the end the cast copy (one
    weight) exists next to it for a moment; the temporary is bounded by WGRAD_SLICE_ELEMS."""
    acc = acc_dtype(w_s.dtype)
    gw = torch.zeros(w_s.shape, dtype=acc, device=w_s.device)
    if acc == w_s.dtype:
        return gw, None
    rows = max(1, min(w_s.shape[0], WGRAD_SLICE_ELEMS // max(1, w_s.shape[1])))
    return gw, torch.empty(rows, w_s.shape[1], dtype=acc, device=w_s.device)


def _chunked_pass(hs, ht, w_s, w_t, spec, group, backend, chunk, scale, need_h, need_w):
    """Per-token divergence [N]; with `scale`, also scale-weighted grads for hidden / weight."""
    n = hs.shape[0]
    d = torch.empty(n, dtype=acc_dtype(hs.dtype), device=hs.device)
    gh = torch.empty_like(hs) if scale is not None and need_h else None
    gw, wtmp = _wgrad_buffers(w_s) if scale is not None and need_w else (None, None)
    # two logit buffers reused by every chunk (on CPU, fresh 64 MiB tensors would be mmap'ed and
    # page-faulted in again for each chunk)
    rows = min(n, chunk)
    zs_buf = torch.empty(rows, w_s.shape[0], dtype=torch.result_type(hs, w_s), device=hs.device)
    zt_buf = torch.empty(rows, w_t.shape[0], dtype=torch.result_type(ht, w_t), device=hs.device)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        zs = torch.mm(hs[a:b], w_s.t(), out=zs_buf[:b - a])
        zt = torch.mm(ht[a:b], w_t.t(), out=zt_buf[:b - a])
        sc = None if scale is None else scale[a:b]
        d[a:b] = rows_forward(zs, zt, spec, group, backend, scale=sc, out=None if sc is None else zs,
                              scratch=True)[0]
        if gh is not None:
            torch.mm(zs, w_s, out=gh[a:b])
        if gw is not None:
            _add_wgrad(gw, zs, hs[a:b], wtmp)
    return d, gh, None if gw is None else gw.to(w_s.dtype)  # the one cast (none for fp32 / fp64)


class _FusedLinearDivergenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ht, w_s, w_t, w, spec, reduction, group, backend, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        wants_grad = need_h or need_w
        ctx.recompute = wants_grad and reduction == "none"
        scale = reduction_scale(w, reduction) if wants_grad and not ctx.recompute else None
        d, gh, gw = _chunked_pass(hs, ht, w_s.detach(), w_t, spec, group, backend, chunk, scale, need_h, need_w)
        # Every tensor backward reads goes through save_for_backward (never a ctx attribute), so saved-tensor
        # hooks (torch.autograd.graph.saved_tensors_hooks: activation offloading, checkpointing) see it and
        # autograd frees it with the graph.
        if ctx.recompute:
            ctx.save_for_backward(hs, ht, w_s, w_t, w)
            ctx.args = (spec, group, backend, chunk)
        else:
            ctx.save_for_backward(gh, gw)  # None where that gradient is not needed
        return reduce_rows(d, w, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if ctx.recompute:
            hs, ht, w_s, w_t, w = ctx.saved_tensors
            spec, group, backend, chunk = ctx.args
            _, gh, gw = _chunked_pass(hs, ht, w_s.detach(), w_t, spec, group, backend, chunk,
                                      w * grad_out.to(w.dtype), need_h, need_w)
        else:
            gh, gw = ctx.saved_tensors
            # grad_out is a scalar here (mean / sum). As a Python float it enters the multiply at fp32 (fp64)
            # precision; cast to a bf16 tensor first it would be rounded, a relative error of up to 2^-9
            # shared by every element of both gradients. One host sync, as the test for 1 needs anyway.
            g = float(grad_out)
            if g != 1.0:  # the usual loss.backward() skips two big multiplies
                gh = None if gh is None else gh * g
                gw = None if gw is None else gw * g
        return gh, None, gw, None, None, None, None, None, None, None


def fused_linear_divergence_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
                                 teacher_weight: torch.Tensor | None = None, *, kind: str = "forward_kl",
                                 beta: float = 0.5, temperature: float = 1.0, clip: float | None = None,
                                 mask: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                                 reduction: str = "mean", process_group=None, chunk_size: int | None = None,
                                 backend: str = "auto") -> torch.Tensor:
    """divergence_loss(student_hidden @ weight^T, teacher_hidden @ teacher_weight^T, ...) without the logits.

    student_hidden / teacher_hidden [..., H] (teacher H may differ when teacher_weight is given), weight
    [V_local, H] (this rank's vocabulary shard under `process_group`); teacher_weight None -> the teacher
    uses `weight` (detached). Options as in `divergence_loss`. Gradients for student_hidden and weight
    when they require grad (see the module doc for grad_hidden under a process group); teacher tensors that
    require grad raise ValueError. chunk_size: tokens per chunk (default: about 2^24 logits per chunk on
    the torch path, 2^25 on CUDA). backend: "auto" | "triton" | "torch" as in divergence_loss.
    """
    backend = check_common(reduction, (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)),
                           backend, student_hidden.device)
    spec = DivergenceSpec.make(kind, beta, temperature, clip)
    w_t = weight.detach() if teacher_weight is None else teacher_weight
    lead = student_hidden.shape[:-1]
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if ht.shape[0] != hs.shape[0] or w_t.shape[0] != weight.shape[0]:
        raise ValueError(f"token or vocab counts differ: hidden {tuple(hs.shape)} / {tuple(ht.shape)}, "
                         f"weights {tuple(weight.shape)} / {tuple(w_t.shape)}")
    n = hs.shape[0]
    chunk = default_chunk(n, weight.shape[0], backend) if chunk_size is None else max(1, int(chunk_size))
    w = token_weights(n, mask, weights, acc_dtype(hs.dtype), hs.device)
    out = _FusedLinearDivergenceFunction.apply(hs, ht, weight, w_t, w, spec, reduction, process_group,
                                               backend, chunk)
    return out.reshape(lead) if reduction == "none" else out
