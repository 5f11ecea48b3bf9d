"""The GPU code path in CI: one distillation step of the tiny config with every kernel forced to the
Triton backend (run by Triton's CPU interpreter, tests/conftest.py) equals the torch backend's step.

The trainer passes backend="auto" to every kernel (the output-layer divergence and the teacher /
student packing), so ATESD_KERNEL_BACKEND decides for all of them (kernels/_dispatch.py). Launches
are counted through the Triton kernels' own pre-run hooks, so a call that silently ran on torch
fails here."""
import ast
import collections
import contextlib
import functools
import os
import pathlib
import types

import numpy as np
import pytest
import torch

from harness import run_distributed
from test_trainer import _cfg

KERNEL_OPS = {"divergence_loss", "fused_linear_divergence_loss", "pack_masked_reference"}


@contextlib.contextmanager
def _count_launches():
    """Kernel name -> launches while inside (every @triton.jit an op launches, through the kernels'
    own pre-run hooks, removed again on exit)."""
    from triton.runtime.jit import KernelInterface

    from atesd_mc.kernels import divergence_triton, masked_reference

    launches: collections.Counter = collections.Counter()
    hooked = []
    for module in (divergence_triton, masked_reference):
        for name, obj in vars(module).items():
            if isinstance(obj, KernelInterface):
                hook = functools.partial(lambda kernel, *a, **k: launches.update([kernel]), name)
                obj.add_pre_run_hook(hook)
                hooked.append((obj, hook))
    try:
        yield launches
    finally:
        for obj, hook in hooked:
            obj.pre_run_hooks.remove(hook)


def _one_step(cfg, backend: str):
    """Loss, every trainable gradient (DDP main_grad, as the optimizer sees it) and the Triton
    launches of the first distillation step, with every kernel on `backend`."""
    from atesd_mc import stages
    from atesd_mc.trainer import build_trainer

    os.environ["ATESD_KERNEL_BACKEND"] = backend  # this forked rank only; read at every op call
    grads = {}
    optimizer_update = stages.optimizer_update

    def capture_then_update(rt, loss):
        grads.update({n: p.main_grad.detach().clone()
                      for n, p in rt.ddp.module.named_parameters() if p.requires_grad})
        return optimizer_update(rt, loss)

    stages.optimizer_update = capture_then_update  # the fork exits after this step
    trainer = build_trainer(cfg)
    with _count_launches() as launches:  # the step's launches only
        record = trainer.train_step()
    return record, grads, dict(launches)


def _tiny(tmp_path, backend: str):
    # Warm-started, so the teacher's extra context moves its distribution and the loss is real;
    # 2 micro-batches of 2 and short rollouts keep the interpreter's launches few. The same seed
    # and cache for both backends (the warm start is trained once, then reused): the same initial
    # weights and rollouts. Separate run directories: one run per directory.
    cfg = _cfg(tmp_path, warm_start_iters=30, warm_start_lr=3e-3, micro_batch_size=2, global_batch_size=4)
    cfg.checkpoint.save = str(tmp_path / f"run-{backend}")
    cfg.generation.max_new_tokens = 8
    # half of each reference, cut inside it (token unit): the pack kernel's truncated piece runs
    cfg.exposure.atesd_exposure, cfg.exposure.reveal_ratio, cfg.exposure.reveal_unit = "fixed", 0.5, "token"
    return cfg


def test_training_step_on_triton_equals_torch(tmp_path):
    out = {b: run_distributed(_one_step, world=1, args=(_tiny(tmp_path, b), b))[0] for b in ("torch", "triton")}
    (ref, grads_ref, launches_ref), (rec, grads, launches) = out["torch"], out["triton"]
    assert launches_ref == {}  # the torch run launched no Triton kernel
    # Teacher and student contexts of the 2 micro-batches and of the teacher score's pair, each
    # packed by the kernel; the fused divergence's statistics, loss and gradient kernels per micro-batch.
    assert launches.get("_pack_kernel") == 2 * (2 + 1), launches
    assert all(launches[k] >= 2 for k in ("_stats_kernel", "_loss_kernel", "_grad_kernel")), launches
    assert rec["alpha"] == ref["alpha"] == 0.5
    assert rec["tokens"] == ref["tokens"]  # the same contexts were packed
    assert ref["loss"] > 1e-3  # a real loss, well above the tolerance
    assert abs(rec["loss"] - ref["loss"]) <= 1e-5 * max(1.0, abs(ref["loss"])), (rec["loss"], ref["loss"])
    assert grads.keys() == grads_ref.keys() and len(grads_ref) > 0
    for name, g in grads_ref.items():
        scale = g.abs().max().item()
        assert scale > 0, name  # every trainable parameter receives gradient
        assert (grads[name] - g).abs().max().item() <= 1e-5 * max(scale, 1e-3), name


def test_package_leaves_every_kernel_backend_to_dispatch():
    """No kernel call in atesd_mc pins a backend (batching.py once pinned torch, so the Triton
    packing kernel never ran in training, not even on CUDA): `auto` and ATESD_KERNEL_BACKEND decide."""
    import atesd_mc

    root = pathlib.Path(atesd_mc.__file__).parent
    calls, pinned = [], []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and getattr(func, "id", getattr(func, "attr", None)) in KERNEL_OPS:
                where = f"{path.relative_to(root)}:{node.lineno}"
                calls.append(where)
                pinned += [where for k in node.keywords if k.arg == "backend"
                           and not (isinstance(k.value, ast.Constant) and k.value.value == "auto")]
    assert len(calls) >= 3, calls  # losses.py (2) and batching.py (1) at least: the scan sees them
    assert pinned == [], pinned


def _examples():
    """Three store-Example look-alikes (the fields build_pair reads) of uneven piece lengths."""
    rng = np.random.default_rng(0)

    def ids(n):
        return rng.integers(1, 300, n)

    out = []
    for ref_len, prefix_len in ((11, 5), (3, 9), (20, 1)):
        teacher = types.SimpleNamespace(prefix=ids(prefix_len), reference=ids(ref_len), answer=ids(2),
                                        transition=ids(3), segment_ends=np.array([ref_len // 2, ref_len]))
        out.append(types.SimpleNamespace(student=ids(prefix_len + 1), teacher=teacher))
    return out


def _pairs_agree(device, monkeypatch, forced: str | None):
    """build_pair on `device` (kernel backend `forced`, None: auto) launches the Triton packing
    kernel once per side and gives exactly the torch-on-CPU batch."""
    from atesd_mc.batching import build_pair

    examples, responses = _examples(), [[5, 6, 7], [], [8]]
    monkeypatch.setenv("ATESD_KERNEL_BACKEND", "torch")
    ref = build_pair(examples, responses, 0.5, "token", torch.device("cpu"))
    if forced is None:
        monkeypatch.delenv("ATESD_KERNEL_BACKEND")
    else:
        monkeypatch.setenv("ATESD_KERNEL_BACKEND", forced)
    with _count_launches() as launches:
        got = build_pair(examples, responses, 0.5, "token", device)
    assert dict(launches) == {"_pack_kernel": 2}  # teacher and student
    for side in ("student", "teacher"):
        a, b = getattr(got, side), getattr(ref, side)
        assert a.tokens.device.type == device.type and a.lengths.device.type == "cpu"
        for field in ("tokens", "predict_index", "lengths"):
            assert torch.equal(getattr(a, field).cpu(), getattr(b, field)), (side, field)
    assert torch.equal(got.rollout_ids.cpu(), ref.rollout_ids)
    assert torch.equal(got.rollout_lengths.cpu(), ref.rollout_lengths)


def test_contexts_forced_to_triton_on_cpu_match_torch(monkeypatch):
    _pairs_agree(torch.device("cpu"), monkeypatch, "triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_packs_contexts_with_triton_on_cuda(monkeypatch):
    _pairs_agree(torch.device("cuda"), monkeypatch, None)


def test_backend_switch(monkeypatch):
    """ATESD_KERNEL_BACKEND replaces `auto` only: an explicit argument wins (the kernel tests pin
    backends to compare them), set-but-empty means unset, anything else is refused."""
    from atesd_mc.kernels._dispatch import resolve_backend

    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # resolve only (nothing launches), also on GPU hosts
    monkeypatch.setenv("ATESD_KERNEL_BACKEND", "triton")
    assert resolve_backend("auto", cpu) == "triton" and resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("ATESD_KERNEL_BACKEND", "")
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv("ATESD_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ATESD_KERNEL_BACKEND"):
        resolve_backend("auto", cpu)
