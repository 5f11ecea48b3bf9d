"""fused_linear_divergence_loss against the float64 oracle (materialised logits + divergence_loss_ref)."""
import contextlib

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from atesd_mc.kernels import divergence as dv
from atesd_mc.kernels import fused_linear_divergence as fld
from atesd_mc.kernels import fused_linear_divergence_loss
from atesd_mc.kernels.reference import divergence_loss_ref, fused_linear_divergence_loss_ref
from harness import run_distributed
from test_kernel_divergence import KINDS, OPTIONS, needs_triton_cpu, one_thread, rel_err  # noqa: F401


def make_inputs(n, h, v, opts, seed=0, h_t=None, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, dtype=torch.float64)
    ht = torch.randn(n, h_t or h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5 * 3
    w_t = None if h_t is None else torch.randn(v, h_t, generator=g, dtype=torch.float64) / h_t ** 0.5 * 3
    kw = {k: opts[k] for k in ("temperature", "clip") if k in opts}
    if opts.get("mask"):
        kw["mask"] = (torch.rand(n, generator=g) > 0.3).to(device)
    if opts.get("weights"):
        kw["weights"] = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(device)
    to = (lambda x: None if x is None else x.to(device))  # noqa: E731
    return to(hs), to(ht), to(w), to(w_t), kw


def run_both(inputs, dtype, backend, kind, beta, reduction, chunk_size=None, grad_h=True, grad_w=True,
             hooks=None):
    """hooks: a context manager around the fused op's call alone (what it saves for backward is unpacked
    through the same hooks; the reference and the grad_output product are outside)."""
    hs, ht, w, w_t, kw = inputs
    cast = (lambda x, d: None if x is None else x.to(d))  # noqa: E731
    a = hs.to(dtype, copy=True).requires_grad_(grad_h)
    wa = w.to(dtype, copy=True).requires_grad_(grad_w)
    with hooks or contextlib.nullcontext():
        out = fused_linear_divergence_loss(a, ht.to(dtype), wa, cast(w_t, dtype), kind=kind, beta=beta,
                                           reduction=reduction, chunk_size=chunk_size, backend=backend, **kw)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(out.device)
    if grad_h or grad_w:
        (out * g.to(out.dtype)).sum().backward()
    assert torch.equal(a.detach(), hs.to(dtype)) and torch.equal(wa.detach(), w.to(dtype))  # inputs untouched
    b = hs.to(dtype).to(torch.float64, copy=True).requires_grad_()
    wb = w.to(dtype).to(torch.float64, copy=True).requires_grad_()
    ref = fused_linear_divergence_loss_ref(b, ht.to(dtype).double(), wb, cast(cast(w_t, dtype), torch.float64),
                                           kind=kind, beta=beta, reduction=reduction, **kw)
    (ref * g).sum().backward()
    return out, a.grad, wa.grad, ref, b.grad, wb.grad


def check(res, tol, name=""):
    out, gh, gw, ref, ref_gh, ref_gw = res
    assert rel_err(out, ref) < tol, name
    if gh is not None:
        assert rel_err(gh, ref_gh) < tol, name
    if gw is not None:
        assert rel_err(gw, ref_gw) < tol, name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_torch_fp32_odd_shape(kind, beta, reduction):
    for name, chunk in (("plain", None), ("all", 100)):  # default chunk and one that doesn't divide N
        res = run_both(make_inputs(423, 96, 1423, OPTIONS[name], seed=1), torch.float32, "torch", kind, beta,
                       reduction, chunk_size=chunk)
        check(res, 1e-5, name)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_torch_single_options_and_teacher_weight(kind, beta):
    for name, reduction in (("temperature", "sum"), ("clip", "none"), ("mask_weights", "mean")):
        res = run_both(make_inputs(61, 96, 1423, OPTIONS[name], seed=2), torch.float32, "torch", kind, beta,
                       reduction, chunk_size=16)
        check(res, 1e-5, name)
    # a separate teacher output layer with its own hidden size
    res = run_both(make_inputs(61, 96, 1423, OPTIONS["all"], seed=3, h_t=40), torch.float32, "torch", kind, beta,
                   "mean", chunk_size=16)
    check(res, 1e-5, "teacher_weight")


def test_grad_subsets_and_no_grad():
    inputs = make_inputs(50, 32, 700, OPTIONS["all"], seed=4)
    for grad_h, grad_w in ((True, False), (False, True)):
        for reduction in ("mean", "none"):
            out, gh, gw, ref, ref_gh, ref_gw = run_both(inputs, torch.float64, "torch", "jsd", 0.4, reduction,
                                                        chunk_size=7, grad_h=grad_h, grad_w=grad_w)
            assert (gh is None) != grad_h and (gw is None) != grad_w
            check((out, gh, gw, ref, ref_gh, ref_gw), 1e-12)
    hs, ht, w, _, kw = inputs
    with torch.no_grad():
        out = fused_linear_divergence_loss(hs, ht, w.requires_grad_(), backend="torch", **kw)
    assert rel_err(out, fused_linear_divergence_loss_ref(hs, ht, w.detach(), **kw)) < 1e-12


class _CopyingHooks:
    """Saved-tensor hooks that hand every saved tensor over as a copy (as activation offloading does) and
    count the calls; backward must then read exactly what went through pack/unpack."""
    def __init__(self):
        self.packed, self.unpacked = [], 0

    def pack(self, x):
        self.packed.append(x.detach().clone())
        return len(self.packed) - 1

    def unpack(self, i):
        self.unpacked += 1
        return self.packed[i].clone()

    def __call__(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_saved_tensor_hooks_see_what_backward_needs(reduction):
    inputs = make_inputs(61, 24, 300, OPTIONS["all"], seed=12)
    hooks = _CopyingHooks()
    res = run_both(inputs, torch.float32, "torch", "jsd", 0.3, reduction, chunk_size=16, hooks=hooks())
    check(res, 1e-5, reduction)
    gh, gw = res[1:3]
    # the op saves nothing but through save_for_backward, and backward unpacked every saved tensor
    assert len(hooks.packed) == (2 if reduction != "none" else 5) and hooks.unpacked == len(hooks.packed)
    hs, ht, w, _, _ = inputs
    if reduction == "none":  # recomputed in backward from the saved inputs (and token weights)
        assert [tuple(x.shape) for x in hooks.packed] == [hs.shape, ht.shape, w.shape, w.shape, (61,)]
        return
    # the gradients themselves, computed in forward: backward only scales them by grad_output
    g = torch.randn((), dtype=torch.float64, generator=torch.Generator().manual_seed(7)).float()
    saved_gh, saved_gw = hooks.packed
    assert saved_gh.shape == hs.shape and saved_gw.shape == w.shape
    assert torch.equal(saved_gh * g, gh) and torch.equal(saved_gw * g, gw)


def bf16_logits_ref(inputs, kind, beta, reduction):
    """float64 loss and gradients (hidden, weight) on the bf16-rounded logits the op itself sees, with run_both's
    grad_output. A bf16 matmul rounds the logits themselves (ulp 0.06 at |z| ~ 10, i.e. percent-level
    probability changes), which no kernel can undo; the oracle gets the same rounded logits (straight-through,
    so its gradient is that of the exact product) and every remaining difference is the op's own error."""
    hs, ht, w, _, kw = inputs
    b = hs.to(torch.bfloat16).to(torch.float64, copy=True).requires_grad_()
    wb = w.to(torch.bfloat16).to(torch.float64, copy=True).requires_grad_()
    zs = b @ wb.t()
    zs = zs + (zs.to(torch.bfloat16).double() - zs).detach()
    zt = (ht.to(torch.bfloat16).double() @ wb.t()).to(torch.bfloat16).double().detach()
    ref = divergence_loss_ref(zs, zt, kind=kind, beta=beta, reduction=reduction, **kw)
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(ref.device)
    (ref * g).sum().backward()
    return ref.detach(), b.grad, wb.grad


def norm_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| (Frobenius): the error of a whole gradient, not of its worst element."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize("kind,beta", KINDS[:3])
def test_bf16(kind, beta):
    inputs = make_inputs(64, 96, 1423, OPTIONS["all"], seed=5)
    out, gh, gw, ref, _, _ = run_both(inputs, torch.bfloat16, "torch", kind, beta, "mean", chunk_size=24)
    assert out.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2
    _, ref_gh, ref_gw = bf16_logits_ref(inputs, kind, beta, "mean")
    for x, r in ((gh, ref_gh), (gw, ref_gw)):
        assert norm_rel_err(x, r) < 2e-2


# (backend, tokens, chunk_size, kind, beta, option set, reduction): 256 chunks each. Summed in bf16, the
# weight gradient's error grew with the chunk count (these cases: 0.95e-2 to 1.8e-2 after 256 chunks, 2e-3
# in one chunk); summed in fp32 and cast once it stays at the one-chunk level. "none" recomputes the
# gradients in backward (the other reductions compute them in forward and scale them by grad_output).
MANY_CHUNK_CASES = [
    ("torch", 1024, 4, "forward_kl", 0.5, "plain", "mean"),
    ("torch", 1024, 4, "jsd", 0.3, "temperature", "none"),
    pytest.param("triton", 256, 1, "forward_kl", 0.5, "plain", "sum", marks=needs_triton_cpu),
]


@pytest.mark.parametrize("backend,n,chunk,kind,beta,opt,reduction", MANY_CHUNK_CASES)
def test_bf16_grads_over_many_chunks(backend, n, chunk, kind, beta, opt, reduction, monkeypatch):
    # each chunk's fp32 weight-gradient product in vocabulary slices of 500 rows: 500, 500, 423
    monkeypatch.setattr(fld, "WGRAD_SLICE_ELEMS", 500 * 96)
    inputs = make_inputs(n, 96, 1423, OPTIONS[opt], seed=13)
    assert -(-n // chunk) >= 256
    _, gh, gw, _, _, _ = run_both(inputs, torch.bfloat16, backend, kind, beta, reduction, chunk_size=chunk)
    assert gh.dtype == gw.dtype == torch.bfloat16
    _, ref_gh, ref_gw = bf16_logits_ref(inputs, kind, beta, reduction)
    assert norm_rel_err(gw, ref_gw) < 5e-3
    assert norm_rel_err(gh, ref_gh) < 5e-3


@needs_triton_cpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_triton_interpreter(kind, beta, reduction, monkeypatch):
    monkeypatch.setattr(dv, "MAX_BLOCK_V_INTERPRET", 128)
    res = run_both(make_inputs(7, 16, 300, OPTIONS["all"], seed=6), torch.float32, "triton", kind, beta, reduction,
                   chunk_size=3)
    check(res, 1e-5)


@needs_triton_cpu
def test_triton_interpreter_bf16(monkeypatch):
    monkeypatch.setattr(dv, "MAX_BLOCK_V_INTERPRET", 128)
    out, *_, ref, _, _ = run_both(make_inputs(6, 16, 300, OPTIONS["all"], seed=7), torch.bfloat16, "triton",
                                  "jsd", 0.5, "sum", chunk_size=4)
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton_cpu)])
def test_extreme_and_fully_masked(backend):
    hs, ht, w, _, _ = make_inputs(6, 8, 300, {}, seed=8)
    # ±1 weights and ±1e3 hidden states: integer logits up to ±8e3 with ties at the max, so the
    # distributions are near one-hot yet the gradients are not all underflowed to zero
    # distributions are near one-hot yet overlap (the teacher flips 2 of the 8 signs), so gradients are O(1)
    hs, w = hs.sign() * 1e3, w.sign()
    ht = hs.clone()
    ht[:, :2] *= -1
    for kind, beta in KINDS:
        for opts in ({}, dict(temperature=2.0, clip=100.0)):
            res = run_both((hs, ht, w, None, opts), torch.float32, backend, kind, beta, "mean", chunk_size=4)
            assert all(torch.isfinite(x).all() for x in res[:3])
            check(res, 1e-5, (kind, beta, opts))
    for reduction in ("mean", "sum", "none"):
        a, wa = hs.float().requires_grad_(), w.float().requires_grad_()
        out = fused_linear_divergence_loss(a, ht.float(), wa, mask=torch.zeros(6, dtype=torch.bool),
                                           reduction=reduction, backend=backend, chunk_size=4)
        out.sum().backward()
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(wa.grad, torch.zeros_like(wa))


def test_errors():
    hs, ht, w, _, _ = make_inputs(4, 8, 30, {}, seed=9)
    with pytest.raises(ValueError, match="teacher_hidden requires grad"):
        fused_linear_divergence_loss(hs, ht.clone().requires_grad_(), w)
    with pytest.raises(ValueError, match="teacher_weight requires grad"):
        fused_linear_divergence_loss(hs, ht, w, w.clone().requires_grad_())
    with pytest.raises(ValueError, match="counts differ"):
        fused_linear_divergence_loss(hs, ht[:3], w)


class _MaxTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (what the fused path may materialise)."""
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):  # bytes: the interpreter moves data through byte views
                self.largest = max(self.largest, x.numel() * x.element_size())
        return out


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton_cpu)])
def test_memory_independent_of_tokens(backend, monkeypatch):
    """No intermediate bigger than one chunk of logits, the outputs ([N, H] and [V, H]) aside."""
    monkeypatch.setattr(dv, "MAX_BLOCK_V_INTERPRET", 1024)
    n, h, v, chunk = (512, 8, 1000, 16) if backend == "torch" else (64, 8, 1000, 4)
    hs, ht, w, _, kw = make_inputs(n, h, v, OPTIONS["all"], seed=10)
    a, wa = hs.float().requires_grad_(), w.float().requires_grad_()
    with _MaxTensor() as probe:
        fused_linear_divergence_loss(a, ht.float(), wa, reduction="sum", backend=backend, chunk_size=chunk,
                                     **kw).backward()
    assert probe.largest <= 4 * max(chunk * v, n * h, v * h), probe.largest
    assert 4 * n * v > 4 * probe.largest  # the materialised fp32 logits would have been far bigger


# ---------------------------------------------------------------------------------------------
# Vocab parallel over 2 gloo ranks (uneven shards). grad_hidden is each shard's partial sum.
# ---------------------------------------------------------------------------------------------
PARALLEL_CASES = [  # (backend, dtype, kind, beta, option set, reduction, split)
    ("torch", torch.float64, "forward_kl", 0.5, "all", "mean", 170),
    ("torch", torch.float64, "jsd", 0.3, "all", "none", 170),
    ("torch", torch.float64, "reverse_kl", 0.5, "clip", "sum", 170),
    ("torch", torch.float32, "jsd", 0.6, "all", "mean", 170),
    ("torch", torch.float64, "forward_kl", 0.5, "all", "sum", 0),  # rank 0: no vocabulary rows at all
    ("triton", torch.float32, "jsd", 0.3, "all", "mean", 170),
    ("triton", torch.float32, "reverse_kl", 0.5, "all", "none", 170),
]
N_PAR, H_PAR, V_PAR = 10, 12, 301  # rank 0 holds vocabulary rows [0, split), rank 1 [split, 301)


def _parallel_rank(cases):
    dv.MAX_BLOCK_V_INTERPRET = 64
    out = []
    for i, (backend, dtype, kind, beta, opt, reduction, split) in enumerate(cases):
        rows = slice(0, split) if dist.get_rank() == 0 else slice(split, V_PAR)
        hs, ht, w, _, kw = make_inputs(N_PAR, H_PAR, V_PAR, OPTIONS[opt], seed=200 + i)
        a = hs.to(dtype, copy=True).requires_grad_()
        wa = w[rows].to(dtype, copy=True).requires_grad_()
        loss = fused_linear_divergence_loss(a, ht.to(dtype), wa, kind=kind, beta=beta, reduction=reduction,
                                            process_group=dist.group.WORLD, backend=backend, chunk_size=4, **kw)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype)).sum().backward()
        out.append((loss.detach(), a.grad, wa.grad))
    return out


def test_vocab_parallel_two_ranks():
    cases = [c for c in PARALLEL_CASES if c[0] == "torch" or not torch.cuda.is_available()]
    ranks = run_distributed(_parallel_rank, world=2, megatron=False, args=(cases,))
    for i, (backend, dtype, kind, beta, opt, reduction, split) in enumerate(cases):
        hs, ht, w, _, kw = make_inputs(N_PAR, H_PAR, V_PAR, OPTIONS[opt], seed=200 + i)
        a, wa = hs.to(dtype, copy=True).requires_grad_(), w.to(dtype, copy=True).requires_grad_()
        loss = fused_linear_divergence_loss(a, ht.to(dtype), wa, kind=kind, beta=beta, reduction=reduction,
                                            backend="torch", **kw)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype)).sum().backward()
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        for r in range(2):
            assert rel_err(ranks[r][i][0], loss) < tol, (i, r)
        assert rel_err(ranks[0][i][1] + ranks[1][i][1], a.grad) < tol, i  # partial grad_hidden, summed
        assert rel_err(torch.cat([ranks[0][i][2], ranks[1][i][2]]), wa.grad) < tol, i


# ---------------------------------------------------------------------------------------------
# Compiled kernels (GPU hosts only).
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,beta", KINDS)
def test_cuda_compiled(kind, beta):
    inputs = make_inputs(300, 256, 32011, OPTIONS["all"], seed=11, device="cuda")
    for reduction in ("mean", "none"):
        check(run_both(inputs, torch.float32, "triton", kind, beta, reduction, chunk_size=128), 1e-5, reduction)
    out, gh, gw, ref, ref_gh, ref_gw = run_both(inputs, torch.bfloat16, "triton", kind, beta, "mean")
    assert rel_err(out, ref) < 2e-2
    # bf16 gradients over 300 chunks: cuBLAS fp32-output products summed in fp32 (fused_linear_divergence._add_wgrad)
    _, gh, gw, _, _, _ = run_both(inputs, torch.bfloat16, "triton", kind, beta, "mean", chunk_size=1)
    _, ref_gh, ref_gw = bf16_logits_ref(inputs, kind, beta, "mean")
    assert norm_rel_err(gw, ref_gw) < 5e-3 and norm_rel_err(gh, ref_gh) < 5e-3
