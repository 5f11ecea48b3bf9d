"""Ahead-of-time compile of every Triton kernel specialisation the ops launch at the shapes users run.

Why: CI runs the kernels in Triton's interpreter, which accepts code the compiler rejects (a bf16 x fp32
tl.dot, for one) and says nothing about registers, spills or shared memory. triton.compile runs every
stage down to ptxas (shipped in the wheel) for a GPUTarget with no GPU and no driver, so CI can catch
all of that before a GPU is lent.

How:
* `record_launches` drives the public ops (`divergence_loss` forward and backward,
  `fused_linear_divergence_loss` with inputs that require grad, `pack_masked_reference`) at user shapes
  (`SHAPES`; meta tensors, see `_DEV`) with `JITFunction.run` replaced by a recorder: no kernel runs, but
  each launcher picks its block sizes and warps as on CUDA, and triton's own binder turns the launch
  arguments into the specialisation the JIT would compile there (signature, constexprs, the %16 / == 1
  attributes of integer and pointer arguments, options) for each target architecture.
* `compile_all` compiles each unique specialisation for GPUTarget("cuda", arch, 32) in a fresh cache
  (cold: the compile time is the first-call compile cost on a device) and reads registers, spills and
  static shared memory from ptxas' -v report, dynamic shared memory from the kernel's metadata.
* `violations` (kernels/aot_report.py) checks them against `LIMITS` and `MAX_SPILL_BYTES`.

This must run in a process without TRITON_INTERPRET=1 (under it @triton.jit builds interpreter objects
that cannot be compiled, and the interpreter patches triton.language in place): `run_subprocess` starts
one. CLI (on a device, tools/gpu_check.sh can pass --arch native, and --load for the driver's own counts):

    python -m atesd_mc.kernels.aot --arch 80,90 [--json out.json] [--jobs N] [--load]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from unittest import mock

import torch

from atesd_mc.kernels.aot_report import (LIMITS, MAX_SPILL_BYTES, format_summary,
                                       format_table, violations)


@dataclass(frozen=True)
class Shapes:
    """The user-scale sizes the ops are driven at (examples/qwen3_*.yaml)."""
    vocab: int = 151_936
    tp_sizes: tuple = (1, 2, 8)
    divisible_by: int = 128             # make_vocab_size_divisible_by
    dtypes: tuple = (torch.bfloat16, torch.float32)
    clips: tuple = (None, 0.05)
    # divergence_loss rows: a micro-batch of 4 x 1024 rollout tokens, a ragged count and a single token
    # (Triton specialises integer arguments on %16 == 0 and == 1; the count of rollout tokens is arbitrary)
    rows: tuple = (4096, 4093, 1)
    # fused op: Qwen3 1.7B / 4B / 8B hidden sizes; its own chunking (a full chunk, then a ragged or a
    # one-row remainder) sets the rows each kernel launch sees
    hiddens: tuple = (2048, 2560, 4096)
    # packing: micro-batch sizes (1, ragged, %16 == 0) x longest sequence (Qwen3 examples: 3072-token
    # teacher context + 1024 rollout tokens -> BLOCK 1024; tiny_arith-like short ones -> smaller blocks)
    pack_batches: tuple = (1, 4, 16)
    # (teacher prefix, reference, answer, transition, rollout, student prompt) tokens per sample
    pack_profiles: tuple = ((256, 3072, 32, 8, 1024, 300), (24, 40, 4, 4, 40, 20))

    def widths(self) -> list[int]:
        """V_local, the width every divergence kernel sees under tensor parallelism: vocab / tp, and what
        training runs: megatron pads the vocabulary to a multiple of divisible_by * tp
        (atesd_mc.model.qwen3.padded_vocab_size) and the loss slices each shard to its real rows, so the
        last rank has fewer (TP 8: 19,072 on ranks 0-6, 18,432 on rank 7)."""
        out = []
        for tp in self.tp_sizes:
            mult = self.divisible_by * tp
            shard = -(-self.vocab // mult) * mult // tp
            out += [self.vocab // tp, shard, self.vocab - (tp - 1) * shard]
        return sorted(set(out), reverse=True)


SHAPES = Shapes()
# The divergence ops are driven on meta tensors: the same Python runs (shapes, strides, dtypes, the
# launchers' choices), no memory is allocated and no matmul computed; a meta tensor's data_ptr is 0 plus
# its offset, as aligned as a fresh CUDA allocation. The packing op reads its offsets on the host (CPU).
_DEV = "meta"


def _triton():
    import triton
    from triton.runtime.jit import JITFunction
    if triton.knobs.runtime.interpret:
        raise RuntimeError("atesd_mc.kernels.aot needs a process without TRITON_INTERPRET=1 "
                           "(use aot.run_subprocess or the CLI)")
    return triton, JITFunction


# ----------------------------------------------------------------------------------------------
# Recording: the public ops at user shapes, kernels replaced by triton's binder.
# ----------------------------------------------------------------------------------------------
@dataclass
class Spec:
    """One specialisation of one kernel for one architecture, as JITFunction.run would compile it."""
    kernel: object      # the JITFunction
    arch: int
    target: object      # GPUTarget("cuda", arch, 32)
    signature: dict
    constexprs: dict
    attrs: dict
    options: object     # the backend's options (num_warps, num_stages, ...)
    about: dict         # `_describe`
    calls: list         # the op calls that launch it


class _Recorder:
    """Stands in for JITFunction.run: binds the launch arguments per architecture, launches nothing."""

    def __init__(self, archs):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        self.backends = {a: (GPUTarget("cuda", a, 32), make_backend(GPUTarget("cuda", a, 32))) for a in archs}
        self.specs: dict = {}   # cache key -> Spec
        self.binders: dict = {}  # (kernel, arch) -> triton's argument binder (built once: exec is slow)
        self.call = ""          # the op call being driven (set by the drivers)

    def run(self, kernel, *args, grid, warmup, **kwargs):
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature
        # the options JITFunction.run adds before binding (triton 3.9, runtime/jit.py)
        kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        for arch, (target, backend) in self.backends.items():
            binder = self.binders.get((kernel, arch))
            if binder is None:
                binder = create_function_from_signature(kernel.signature, kernel.params, backend)
                self.binders[kernel, arch] = binder
            bound, specialization, options = binder(*args, **kwargs)
            key = (kernel, arch, repr(specialization), repr(sorted(options.items())))
            if key not in self.specs:
                opts, sig, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
                self.specs[key] = Spec(kernel, arch, target, sig, constexprs, attrs, opts,
                                       _describe(sig, constexprs, attrs, opts), [])
            self.specs[key].calls.append(self.call)


def _describe(sig, constexprs, attrs, opts) -> dict:
    """Readable specialisation: element type of the first pointer (and of all of them), constexprs (integer
    arguments equal to 1 among them), integer arguments Triton knows to be multiples of 16, warps, stages."""
    names = list(sig)
    ptrs = [t[1:] for t in sig.values() if t.startswith("*")]
    runs = [[t, sum(1 for _ in g)] for t, g in itertools.groupby(ptrs)]  # bf16, bf16, fp32 -> bf16x2/fp32
    return dict(elem=ptrs[0] if ptrs else "-", ptrs="/".join(t + (f"x{n}" if n > 1 else "") for t, n in runs) or "-",
                constexprs={names[i]: str(getattr(v, "name", v)) for (i,), v in constexprs.items()},
                div16=[names[i] for (i,), hints in attrs.items()
                       if sig[names[i]][0] in "iu" and any(h[0] == "tt.divisibility" for h in hints)],
                warps=opts.num_warps, stages=opts.num_stages)


def _label(d: dict) -> str:
    """e.g. `bf16x2/fp32x3 BLOCK_V=4096 ACC=fp32 KIND=2 HAS_CLIP=True %16:N,V w8` (pointee types first)."""
    return " ".join([d["ptrs"], *(f"{k}={v}" for k, v in d["constexprs"].items()),
                     "%16:" + (",".join(d["div16"]) or "-"), f"w{d['warps']}"])


@contextlib.contextmanager
def _recording(recorder: _Recorder):
    """JITFunction.run -> the recorder. Every kernels module's own `interpreting` says False, so the
    launchers choose the compiled path's configuration (num_warps, MAX_BLOCK_V, no interpreter-only
    rounding); _dispatch's says True, so that resolve_backend accepts meta / CPU tensors for "triton"."""
    _, JITFunction = _triton()
    from . import _dispatch
    mods = [m for name, m in sorted(sys.modules.items())
            if name.startswith(__package__ + ".") and m is not _dispatch
            and getattr(m, "interpreting", None) is _dispatch.interpreting]
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(
            JITFunction, "run", lambda k, *a, grid, warmup, **kw: recorder.run(k, *a, grid=grid, warmup=warmup, **kw)))
        stack.enter_context(mock.patch.object(_dispatch, "interpreting", lambda: True))
        for m in mods:
            stack.enter_context(mock.patch.object(m, "interpreting", lambda: False))
        yield


def _drive_divergence(rec: _Recorder, shapes: Shapes) -> None:
    from .divergence import KINDS, divergence_loss
    for dtype in shapes.dtypes:
        for v in shapes.widths():
            for kind in KINDS:
                for clip in shapes.clips:
                    for n in shapes.rows:
                        rec.call = f"divergence_loss {_dt(dtype)} [{n}, {v}] {kind} clip={clip}"
                        zs = torch.empty(n, v, dtype=dtype, device=_DEV, requires_grad=True)
                        divergence_loss(zs, torch.empty(n, v, dtype=dtype, device=_DEV), kind=kind, clip=clip,
                                        weights=torch.ones(n, device=_DEV), reduction="sum",
                                        backend="triton").backward()


def _drive_fused(rec: _Recorder, shapes: Shapes) -> None:
    """The training loss (atesd_mc.losses.distill_loss): hidden states and the (shard of the) output layer.
    Forward only: with inputs that require grad the forward launches the gradient kernel itself (the
    backward only rescales, and reads its grad_output, which a meta tensor cannot give)."""
    from .divergence import KINDS
    from .fused_linear_divergence import default_chunk, fused_linear_divergence_loss
    for dtype in shapes.dtypes:
        for v in shapes.widths():
            chunk = default_chunk(1 << 30, v, "triton")  # the op's own chunk rows for a long batch
            for h in shapes.hiddens:
                for kind in KINDS:
                    for clip in shapes.clips:
                        for n in (chunk + 3, chunk + 1):  # a full chunk, then a ragged / a one-row one
                            rec.call = f"fused_linear {_dt(dtype)} [{n}, {h}] x [{v}, {h}] {kind} clip={clip}"
                            hs = torch.empty(n, h, dtype=dtype, device=_DEV, requires_grad=True)
                            w = torch.empty(v, h, dtype=dtype, device=_DEV, requires_grad=True)
                            fused_linear_divergence_loss(hs, torch.empty(n, h, dtype=dtype, device=_DEV), w,
                                                         kind=kind, clip=clip, reduction="sum",
                                                         weights=torch.ones(n, device=_DEV), backend="triton")


def _drive_pack(rec: _Recorder, shapes: Shapes) -> None:
    from .masked_reference import Ragged, pack_masked_reference
    for b in shapes.pack_batches:
        for prefix, ref, answer, trans, rollout, prompt in shapes.pack_profiles:
            rec.call = f"pack_masked_reference B={b} teacher<={prefix + ref + answer + trans + rollout}"

            def rag(n):
                return Ragged(torch.zeros(b * n, dtype=torch.int64), torch.arange(b + 1, dtype=torch.int64) * n)
            pack_masked_reference(student_prompt=rag(prompt), teacher_prefix=rag(prefix), reference=rag(ref),
                                  answer=rag(answer), transition=rag(trans), rollout=rag(rollout),
                                  keep=torch.full((b,), ref, dtype=torch.int64), backend="triton")


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def record_launches(archs=(80, 90), shapes: Shapes = SHAPES) -> list[Spec]:
    """Every unique (kernel, specialisation, arch) the public ops launch at `shapes`."""
    _triton()
    rec = _Recorder(archs)
    with _recording(rec):
        _drive_divergence(rec, shapes)
        _drive_fused(rec, shapes)
        _drive_pack(rec, shapes)
    return list(rec.specs.values())


# ----------------------------------------------------------------------------------------------
# Compiling: triton.compile per specialisation, resources from ptxas -v and the metadata.
# ----------------------------------------------------------------------------------------------
_WORK: dict = {"specs": [], "load": False}  # the forked compile workers' work (inherited, never pickled)

_PTXAS = {"regs": r"Used (\d+) registers", "smem_static": r"(\d+) bytes smem",
          "stack": r"(\d+) bytes stack frame", "spill_stores": r"(\d+) bytes spill stores",
          "spill_loads": r"(\d+) bytes spill loads"}


def _compile_one(i: int) -> dict:
    """Compile spec i (fresh cache: ptxas runs, and its -v report, printed on request, is captured)."""
    import triton
    from triton.compiler import ASTSource
    spec = _WORK["specs"][i]
    row = dict(kernel=spec.kernel.fn.__name__, arch=spec.arch, spec=_label(spec.about), **spec.about,
               calls=len(spec.calls), example_call=spec.calls[0], error=None)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            triton.knobs.nvidia.dump_ptxas_log = True
            ck = triton.compile(ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs),
                                target=spec.target, options=spec.options.__dict__)
    except Exception as e:  # noqa: BLE001 - a compile error is a result to report, not a crash
        row["error"] = f"{type(e).__name__}: {e}"[:4000]
        return row
    row["compile_s"] = round(time.perf_counter() - start, 3)
    for name, pattern in _PTXAS.items():
        found = re.findall(pattern, log.getvalue())
        row[name] = int(found[-1]) if found else None
    if row["regs"] is not None and row["smem_static"] is None:
        row["smem_static"] = 0  # ptxas prints "N bytes smem" only for N > 0
    row["smem_dynamic"] = int(ck.metadata.shared)  # what the launch requests
    row["smem"] = row["smem_dynamic"] + (row["smem_static"] or 0)
    if _WORK["load"]:  # on the device: the driver's own numbers (triton's n_spills is local bytes / 4)
        ck._init_handles()
        row["driver_regs"], row["driver_local_bytes"] = ck.n_regs, 4 * ck.n_spills
    return row


def compile_all(specs: list[Spec], jobs: int | None = None, cache_dir: str | None = None,
                load: bool = False) -> list[dict]:
    """Compile every spec (in `jobs` forked processes) into `cache_dir` (default: a fresh temporary one, so
    that every compile is cold: its time is a first call's compile cost, and ptxas reports on each); rows
    in the order of `specs`. load: also load each kernel on this machine's GPU (arch must be its own)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import triton
    jobs = max(1, min(len(specs), jobs or os.cpu_count() or 1))
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="atesd-aot-"))
        stack.enter_context(triton.knobs.cache.scope())
        triton.knobs.cache.dir = cache_dir
        _WORK.update(specs=specs, load=load)
        try:
            if jobs == 1:
                return [_compile_one(i) for i in range(len(specs))]
            # fork: the workers inherit the specs (JITFunctions, triton dtypes) instead of unpickling them;
            # a worker that dies (a compiler crash) raises BrokenProcessPool here rather than hanging
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
                return list(pool.map(_compile_one, range(len(specs))))
        finally:
            _WORK.update(specs=[], load=False)


# CLI and the subprocess entry point the tests use.


def _device_arch() -> int:
    """The visible GPU's compute capability, asked in a child process: CUDA initialised in this one would
    be unusable in the forked compile workers."""
    proc = subprocess.run([sys.executable, "-c", "import torch; print(*torch.cuda.get_device_capability())"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"--arch native: no CUDA device visible ({proc.stderr.strip().splitlines()[-1:]})")
    major, minor = proc.stdout.split()
    return 10 * int(major) + int(minor)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities, or 'native'")
    ap.add_argument("--json", help="write the rows (and their violations) here")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    ap.add_argument("--cache-dir", help="triton cache to compile into (default: a fresh temporary one)")
    ap.add_argument("--load", action="store_true", help="with --arch native: load each kernel on the GPU and "
                    "record the driver's registers / local memory next to ptxas' (driver_* in --json)")
    args = ap.parse_args(argv)
    archs = (_device_arch(),) if args.arch == "native" else tuple(int(a) for a in args.arch.split(","))
    if any(a not in LIMITS for a in archs):
        ap.error(f"no limits known for {archs}: add them to LIMITS")
    if args.load and args.arch != "native":
        ap.error("--load needs --arch native (a kernel loads only on its own architecture)")
    t0 = time.perf_counter()
    specs = record_launches(archs)
    t1 = time.perf_counter()
    rows = compile_all(specs, args.jobs, args.cache_dir, load=args.load)
    t2 = time.perf_counter()
    for r in rows:
        r["violations"] = violations(r)
    bad = sum(bool(r["violations"]) for r in rows)
    print(format_table(rows), format_summary(rows), sep="\n\n")
    smem = "/".join(str(LIMITS[a]["smem"]) for a in archs)
    print(f"\n{len(rows)} specialisations for {', '.join(f'sm_{a}' for a in archs)}: recorded in {t1 - t0:.1f} s, "
          f"compiled in {t2 - t1:.1f} s; {bad} beyond the limits (registers <= 255 per thread and 64K per "
          f"block, spills <= {MAX_SPILL_BYTES} B, shared memory <= {smem} B)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"archs": list(archs), "max_spill_bytes": MAX_SPILL_BYTES, "limits": LIMITS,
                       "record_s": t1 - t0, "compile_s": t2 - t1, "rows": rows}, f, indent=1)
    return 1 if bad else 0


def compile_env() -> dict:
    """This process's environment without TRITON_INTERPRET, for a child that compiles (see module doc)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_subprocess(argv: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python -m atesd_mc.kernels.aot *argv` in a process without TRITON_INTERPRET."""
    return subprocess.run([sys.executable, "-m", __name__, *argv], env=compile_env(), capture_output=True,
                          text=True, timeout=timeout)


if __name__ == "__main__":
    sys.exit(main())
