"""divergence_loss against the float64 oracle (kernels.reference): torch path on odd shapes, Triton
kernels under TRITON_INTERPRET=1 on small ones, vocab-parallel over 2 gloo ranks, compiled on CUDA."""
import pytest
import torch
import torch.distributed as dist

from atesd_mc.kernels import divergence as dv
from atesd_mc.kernels import divergence_loss
from atesd_mc.kernels.reference import divergence_loss_ref
from harness import run_distributed

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]
# option sets: each feature alone and all together
OPTIONS = {
    "plain": {},
    "temperature": dict(temperature=1.7),
    "clip": dict(clip=0.005),
    "mask_weights": dict(mask=True, weights=True),
    "all": dict(temperature=0.6, clip=0.05, mask=True, weights=True),
}
needs_triton_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests are for CPU hosts")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for these small shapes: as fast, and on a loaded 2-core machine 5x faster
    (OpenMP threads wait at every barrier for a descheduled sibling). Imported by the other kernel tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-norm relative error (the loss scalar: plain relative error)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def make_inputs(n, v, opts, seed=0, scale=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    zt = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    kw = {k: opts[k] for k in ("temperature", "clip") if k in opts}
    if opts.get("mask"):
        kw["mask"] = (torch.rand(n, generator=g) > 0.3).to(device)
    if opts.get("weights"):
        kw["weights"] = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(device)
    return zs.to(device), zt.to(device), kw


def run_both(zs, zt, dtype, kw, backend, kind, beta, reduction):
    """(loss, grad) of the op on `dtype` inputs and of the float64 oracle on the same (rounded) values."""
    a = zs.to(dtype, copy=True).requires_grad_()  # copies: the op and the oracle must not share .grad
    t = zt.to(dtype, copy=True)
    out = divergence_loss(a, t, kind=kind, beta=beta, reduction=reduction, backend=backend, **kw)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(out.device)
    (out * g.to(out.dtype)).sum().backward()
    assert torch.equal(a.detach(), zs.to(dtype)) and torch.equal(t, zt.to(dtype))  # inputs left untouched
    b = zs.to(dtype).to(torch.float64, copy=True).requires_grad_()
    ref = divergence_loss_ref(b, zt.to(dtype).double(), kind=kind, beta=beta, reduction=reduction, **kw)
    (ref * g).sum().backward()
    return out, a.grad, ref, b.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_torch_fp32_odd_shape(kind, beta, reduction):
    for name in ("plain", "all"):
        zs, zt, kw = make_inputs(423, 1423, OPTIONS[name], seed=1)
        out, grad, ref, ref_grad = run_both(zs, zt, torch.float32, kw, "torch", kind, beta, reduction)
        assert out.dtype == torch.float32
        assert rel_err(out, ref) < 1e-5, name
        assert rel_err(grad, ref_grad) < 1e-5, name


@pytest.mark.parametrize("kind,beta", KINDS)
def test_torch_fp32_single_options(kind, beta):
    """Each option on its own (the matrix above has none or all), one reduction each."""
    for name, reduction in (("temperature", "sum"), ("clip", "none"), ("mask_weights", "mean")):
        zs, zt, kw = make_inputs(97, 1423, OPTIONS[name], seed=11)
        out, grad, ref, ref_grad = run_both(zs, zt, torch.float32, kw, "torch", kind, beta, reduction)
        assert rel_err(out, ref) < 1e-5, name
        assert rel_err(grad, ref_grad) < 1e-5, name
    if OPTIONS["clip"]["clip"] is not None:  # the clip must actually bind somewhere for the test to mean much
        from atesd_mc.kernels.reference import divergence_terms_ref
        terms = divergence_terms_ref(zs, zt, kind=kind, beta=beta)
        assert (terms > OPTIONS["clip"]["clip"]).float().mean() > 0.01


@pytest.mark.parametrize("kind,beta", KINDS)
def test_torch_bf16(kind, beta):
    for name in ("plain", "all"):
        zs, zt, kw = make_inputs(64, 1423, OPTIONS[name], seed=2)
        out, grad, ref, ref_grad = run_both(zs, zt, torch.bfloat16, kw, "torch", kind, beta, "mean")
        assert grad.dtype == torch.bfloat16
        assert rel_err(out, ref) < 2e-2, name
        assert float((grad.double() - ref_grad).norm() / ref_grad.norm()) < 2e-2, name


@needs_triton_cpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_triton_interpreter(kind, beta, reduction, monkeypatch):
    monkeypatch.setattr(dv, "MAX_BLOCK_V_INTERPRET", 128)  # 3 vocab blocks, the last one partial
    for name, dtype, tol in (("plain", torch.float32, 1e-5), ("all", torch.float32, 1e-5),
                             ("all", torch.float64, 1e-12)):
        zs, zt, kw = make_inputs(6, 300, OPTIONS[name], seed=3)
        out, grad, ref, ref_grad = run_both(zs, zt, dtype, kw, "triton", kind, beta, reduction)
        assert rel_err(out, ref) < tol, (name, dtype)
        assert rel_err(grad, ref_grad) < tol, (name, dtype)


@needs_triton_cpu
def test_triton_interpreter_bf16_and_leading_dims(monkeypatch):
    monkeypatch.setattr(dv, "MAX_BLOCK_V_INTERPRET", 128)
    zs, zt, kw = make_inputs(8, 257, OPTIONS["all"], seed=4)
    for kind, beta in KINDS[:3]:
        out, grad, ref, _ = run_both(zs, zt, torch.bfloat16, kw, "triton", kind, beta, "sum")
        assert rel_err(out, ref) < 2e-2 and grad.dtype == torch.bfloat16
    # [B, S, V] logits, per-token output keeps the leading shape
    a, b = zs.float().reshape(2, 4, 257), zt.float().reshape(2, 4, 257)
    mask = kw["mask"].reshape(2, 4)
    out = divergence_loss(a, b, kind="jsd", mask=mask, reduction="none", backend="triton")
    ref = divergence_loss_ref(a.double(), b.double(), kind="jsd", mask=mask, reduction="none")
    assert out.shape == (2, 4) and rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton_cpu)])
def test_extreme_logits(backend):
    g = torch.Generator().manual_seed(5)
    zs = torch.randn(6, 300, generator=g, dtype=torch.float64).sign() * 1e4
    zt = torch.randn(6, 300, generator=g, dtype=torch.float64) * 1e4
    zs[0, :] = 1e4  # a flat row next to ±1e4 rows
    for kind, beta in KINDS:
        for opts in ({}, dict(temperature=2.0, clip=50.0)):
            out, grad, ref, ref_grad = run_both(zs, zt, torch.float32, opts, backend, kind, beta, "mean")
            assert torch.isfinite(out).all() and torch.isfinite(grad).all()
            assert rel_err(out, ref) < 1e-5, (kind, beta, opts)
            assert rel_err(grad, ref_grad) < 1e-5, (kind, beta, opts)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton_cpu)])
def test_fully_masked_gives_zero(backend):
    zs, zt, _ = make_inputs(5, 100, {}, seed=6)
    for reduction in ("mean", "sum", "none"):
        a = zs.float().requires_grad_()
        out = divergence_loss(a, zt.float(), kind="jsd", mask=torch.zeros(5, dtype=torch.bool),
                              weights=torch.rand(5), reduction=reduction, backend=backend)
        out.sum().backward()
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.equal(a.grad, torch.zeros_like(a))


def test_zero_weight_mean_and_no_tokens():
    zs, zt, _ = make_inputs(4, 50, {}, seed=8)
    a = zs.requires_grad_()
    out = divergence_loss(a, zt, weights=torch.zeros(4, dtype=torch.float64), backend="torch")
    out.backward()
    assert out.item() == 0.0 and torch.equal(a.grad, torch.zeros_like(a))
    empty = divergence_loss(torch.zeros(0, 7), torch.zeros(0, 7), backend="torch")
    assert empty.item() == 0.0


def test_errors(monkeypatch):
    zs, zt, _ = make_inputs(3, 20, {}, seed=9)
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        divergence_loss(zs, zt.clone().requires_grad_())
    with pytest.raises(ValueError, match="kind"):
        divergence_loss(zs, zt, kind="kl")
    with pytest.raises(ValueError, match="beta"):
        divergence_loss(zs, zt, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        divergence_loss(zs, zt, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        divergence_loss(zs, zt, reduction="avg")
    with pytest.raises(ValueError, match="shapes"):
        divergence_loss(zs, zt[:, :10])
    with pytest.raises(ValueError, match="backend"):
        divergence_loss(zs, zt, backend="cuda")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            divergence_loss(zs, zt, backend="triton")


def test_row_work_restores_thread_count():
    """The torch path runs its row-wise blocks on TORCH_ROW_THREADS threads and restores the setting."""
    torch.set_num_threads(2)
    zs, zt, _ = make_inputs(4, 50, {}, seed=12)
    divergence_loss(zs.requires_grad_(), zt, backend="torch").backward()
    assert torch.get_num_threads() == 2 and dv.TORCH_ROW_THREADS == 1


def test_auto_backend_is_torch_on_cpu(monkeypatch):
    from atesd_mc.kernels._dispatch import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("ATESD_KERNEL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # resolve only (nothing launches), also on GPU hosts
    assert resolve_backend("auto", torch.device("cpu")) == "triton"
    monkeypatch.setenv("ATESD_KERNEL_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cuda")) == "torch"


# ---------------------------------------------------------------------------------------------
# Vocab parallel: 2 gloo ranks, uneven shards, every case in one fork.
# ---------------------------------------------------------------------------------------------
PARALLEL_CASES = [  # (backend, dtype, kind, beta, option set, reduction, split)
    ("torch", torch.float64, "forward_kl", 0.5, "all", "mean", 140),
    ("torch", torch.float64, "reverse_kl", 0.5, "all", "none", 140),
    ("torch", torch.float64, "jsd", 0.3, "all", "sum", 140),
    ("torch", torch.float64, "jsd", 0.3, "plain", "mean", 140),
    ("torch", torch.float32, "jsd", 0.7, "all", "mean", 140),
    ("torch", torch.float64, "jsd", 0.3, "all", "mean", 0),  # rank 0 holds no vocabulary (TP vocab padding)
    ("triton", torch.float32, "forward_kl", 0.5, "all", "mean", 140),
    ("triton", torch.float32, "jsd", 0.3, "all", "none", 140),
    ("triton", torch.float64, "reverse_kl", 0.5, "clip", "sum", 140),
    ("triton", torch.float64, "jsd", 0.6, "all", "mean", 0),
]
N_PAR, V_PAR = 12, 301  # rank 0 holds columns [0, split), rank 1 [split, 301)


def _parallel_rank(cases):
    dv.MAX_BLOCK_V_INTERPRET = 64
    dv.TORCH_BLOCK_ELEMS = 512  # several torch row blocks per call: still 3 all-reduces in total
    calls = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (calls.append(1), all_reduce(*a, **k))[1]
    out = []
    for i, (backend, dtype, kind, beta, opt, reduction, split) in enumerate(cases):
        cols = slice(0, split) if dist.get_rank() == 0 else slice(split, V_PAR)
        zs, zt, kw = make_inputs(N_PAR, V_PAR, OPTIONS[opt], seed=100 + i)
        a = zs[:, cols].to(dtype).contiguous().requires_grad_()
        calls.clear()
        loss = divergence_loss(a, zt[:, cols].to(dtype).contiguous(), kind=kind, beta=beta, reduction=reduction,
                               process_group=dist.group.WORLD, backend=backend, **kw)
        n_forward = len(calls)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype)).sum().backward()
        out.append((loss.detach(), a.grad, n_forward, len(calls) - n_forward))
    return out


def test_vocab_parallel_two_ranks():
    cases = [c for c in PARALLEL_CASES if c[0] == "torch" or not torch.cuda.is_available()]
    ranks = run_distributed(_parallel_rank, world=2, megatron=False, args=(cases,))
    for i, (backend, dtype, kind, beta, opt, reduction, split) in enumerate(cases):
        zs, zt, kw = make_inputs(N_PAR, V_PAR, OPTIONS[opt], seed=100 + i)
        a = zs.to(dtype, copy=True).requires_grad_()
        loss = divergence_loss(a, zt.to(dtype), kind=kind, beta=beta, reduction=reduction, backend="torch", **kw)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype)).sum().backward()
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        grad = torch.cat([ranks[0][i][1], ranks[1][i][1]], dim=1)
        for r in range(2):
            assert rel_err(ranks[r][i][0], loss) < tol, (i, r)
            assert ranks[r][i][2:] == (3, 0), (i, r)  # all-reduces in forward (max, sum-exp, sums), backward
        assert rel_err(grad, a.grad) < tol, i


# ---------------------------------------------------------------------------------------------
# Compiled kernels (GPU hosts only).
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled(kind, beta, dtype):
    for name in ("plain", "all"):
        zs, zt, kw = make_inputs(97, 32011, OPTIONS[name], seed=10, device="cuda")
        for reduction in ("mean", "none"):
            out, grad, ref, ref_grad = run_both(zs, zt, dtype, kw, "triton", kind, beta, reduction)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert rel_err(out, ref) < tol, (name, reduction)
            assert float((grad.double() - ref_grad).norm() / ref_grad.norm()) < tol, (name, reduction)
