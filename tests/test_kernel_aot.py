"""Every Triton kernel specialisation the ops launch at user shapes compiles for sm_80 and sm_90, no GPU needed.

The interpreter the other kernel tests run accepts code the compiler rejects and says nothing about registers,
spills or shared memory; `atesd_mc.kernels.aot` drives the public ops at user shapes, records the launches the
wrappers configure and compiles each specialisation down to ptxas (see its module doc). It runs in a child
process without TRITON_INTERPRET (this one has it set by conftest). `pytest -s` prints the table.
"""
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import atesd_mc.kernels as kernels_pkg  # noqa: E402
from atesd_mc.kernels import aot  # noqa: E402
from atesd_mc.kernels.divergence import MAX_BLOCK_V  # noqa: E402

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "aot.json"
    # the timeout only guards against a hung compiler; nothing here depends on how long the run takes
    proc = aot.run_subprocess(["--arch", ",".join(map(str, ARCHS)), "--json", str(path)], timeout=1800)
    print(proc.stdout)  # the table (pytest -s)
    assert path.exists(), f"AOT run failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return proc, json.loads(path.read_text())


def _rows(data, kernel, arch):
    return [r for r in data["rows"] if r["kernel"] == kernel and r["arch"] == arch]


def test_every_specialisation_compiles_within_the_limits(report):
    proc, data = report
    bad = [f"{r['kernel']} sm{r['arch']} {r['spec']}: {'; '.join(r['violations'])}"
           for r in data["rows"] if r["violations"]]
    assert not bad and proc.returncode == 0, "\n".join(bad) + "\n\n" + proc.stdout + proc.stderr[-4000:]
    for r in data["rows"]:  # ptxas reported on every one (violations() would say so otherwise)
        assert r["regs"] > 0 and r["spill_stores"] is not None and r["compile_s"] > 0, r


def test_covers_every_kernel_the_package_defines(report):
    """A new @triton.jit kernel (named *_kernel) that no driver in aot launches fails here."""
    defined = set()
    for mod in pkgutil.iter_modules(kernels_pkg.__path__):
        m = importlib.import_module(f"{kernels_pkg.__name__}.{mod.name}")
        defined |= {n for n, v in vars(m).items() if n.endswith("_kernel") and hasattr(v, "fn")}
    assert defined >= {"_stats_kernel", "_loss_kernel", "_grad_kernel", "_pack_kernel"}
    for arch in ARCHS:
        assert {r["kernel"] for r in report[1]["rows"] if r["arch"] == arch} == defined


def _int_case(row, name="N"):
    c = row["constexprs"]
    return "one" if c.get(name) == "1" else "div16" if name in row["div16"] else "ragged"


def test_divergence_kernels_at_user_shapes(report):
    """bf16 / fp32, every kind, clip on and off, rows a multiple of 16, ragged and 1, with the launch
    configuration of the compiled path (not the interpreter's block cap or its bf16 rounding)."""
    data = report[1]
    for arch in ARCHS:
        for kernel in ("_loss_kernel", "_grad_kernel", "_stats_kernel"):
            rows = _rows(data, kernel, arch)
            seen = {(r["elem"], r["constexprs"].get("KIND"), r["constexprs"].get("HAS_CLIP"), _int_case(r))
                    for r in rows}
            kinds = ("0", "1", "2") if kernel != "_stats_kernel" else (None,)
            clips = ("True", "False") if kernel != "_stats_kernel" else (None,)
            want = {(e, k, c, n) for e in ("bf16", "fp32") for k in kinds for c in clips
                    for n in ("div16", "ragged", "one")}
            assert seen == want, (kernel, arch, want ^ seen)
            for r in rows:
                assert r["constexprs"]["BLOCK_V"] == str(MAX_BLOCK_V) and r["constexprs"]["ACC"] == "fp32", r
                assert {"V", "stride_s", "stride_t"} <= set(r["div16"]), r  # 151,936 / 2 / 8 are multiples of 16
                assert r["constexprs"].get("ROUND_BF16", "False") == "False", r


def test_packing_kernel_at_user_shapes(report):
    """Teacher (5 pieces) and student (2) streams, long sequences (BLOCK 1024) and short, micro-batches of 1."""
    data = report[1]
    for arch in ARCHS:
        rows = _rows(data, "_pack_kernel", arch)
        seen = {(r["constexprs"]["P"], r["constexprs"]["BLOCK"], _int_case(r, "B")) for r in rows}
        for p in ("5", "2"):
            for b in ("one", "ragged", "div16"):
                assert (p, "1024", b) in seen, (arch, p, b, seen)
        assert any(int(block) < 1024 for _, block, _ in seen)


def test_violations_flag_each_limit():
    ok = dict(arch=80, warps=8, regs=80, spill_stores=0, spill_loads=0, smem_static=0, smem=32, error=None)
    assert aot.violations(ok) == []
    assert aot.violations({**ok, "regs": 256})
    assert aot.violations({**ok, "warps": 16, "regs": 129})  # 136 x 512 threads > 64K registers per block
    assert aot.violations({**ok, "warps": 16, "regs": 128}) == []
    assert aot.violations({**ok, "spill_stores": aot.MAX_SPILL_BYTES + 4})
    assert aot.violations({**ok, "spill_loads": aot.MAX_SPILL_BYTES}) == []
    assert aot.violations({**ok, "smem": 163 * 1024 + 1})
    assert aot.violations({**ok, "arch": 90, "smem": 163 * 1024 + 1}) == []
    assert aot.violations({**ok, "arch": 90, "smem": 227 * 1024 + 1})
    assert "compile error" in aot.violations({**ok, "error": "CompilationError: bf16 x fp32 dot"})[0]
    assert aot.violations({**ok, "regs": None})  # no ptxas report: cannot vouch for it


_BAD_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))
"""

_DRIVE_BAD_KERNEL = """
import json, sys, torch
from atesd_mc.kernels import aot
import bad_kernel
rec = aot._Recorder((80, 90))
with aot._recording(rec):
    for dtype in (torch.bfloat16, torch.float32):  # bf16 x bf16, then bf16 x fp32
        bad_kernel.dot_kernel[(1,)](torch.empty(16, 16, dtype=torch.bfloat16, device="meta"),
                                    torch.empty(16, 16, dtype=dtype, device="meta"),
                                    torch.empty(16, 16, device="meta"), BLOCK=16)
rows = aot.compile_all(list(rec.specs.values()), jobs=1)
json.dump([dict(ptrs=r["ptrs"], arch=r["arch"], violations=aot.violations(r)) for r in rows], sys.stdout)
"""


def test_reports_a_kernel_the_compiler_rejects(tmp_path):
    """A bf16 x fp32 tl.dot (the interpreter runs it) is a compile error on both architectures; the same
    kernel with matching operands compiles within the limits."""
    (tmp_path / "bad_kernel.py").write_text(_BAD_KERNEL)
    proc = subprocess.run([sys.executable, "-c", _DRIVE_BAD_KERNEL], cwd=tmp_path, env=aot.compile_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = {(r["ptrs"], r["arch"]): r["violations"] for r in json.loads(proc.stdout)}
    assert set(got) == {(p, a) for p in ("bf16x2/fp32", "bf16/fp32x2") for a in ARCHS}
    for arch in ARCHS:
        assert got["bf16x2/fp32", arch] == []
        bad = got["bf16/fp32x2", arch]
        assert len(bad) == 1 and "compile error" in bad[0] and "same dtype" in bad[0], bad


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter set (CPU CI)")
def test_refuses_to_record_under_the_interpreter():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.record_launches()
