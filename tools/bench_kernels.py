"""Benchmark the distillation kernels: time (p50/p20/p80 over repeats, warm-up excluded) and peak memory.

Kernels and providers:
  fused_linear  naive   materialise h_s W^T and h_t W_t^T, log-softmax both, divergence (torch autograd)
                fused   atesd_mc.kernels.fused_linear_divergence_loss (Triton on CUDA, chunked torch on CPU)
                liger   liger_kernel's LigerFusedLinearJSD (kind jsd, when liger-kernel is installed)
  divergence    naive   log-softmax of both given logits, divergence (torch autograd)
                ours    atesd_mc.kernels.divergence_loss
Modes: fwd (the training forward, inputs require grad: the fused op also computes its gradients here),
bwd (backward only, after an untimed forward), full (forward + backward).

Peak memory is the extra memory above what is live just before the timed region, from one further,
untimed run:
  * CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the run.
  * CPU: resident set size (RSS) sampled every 0.5 ms by a background thread, maximum minus the RSS just
    before the run. malloc_trim(0) runs first, so freed heap memory that glibc would keep cached does not
    hide in the baseline. RSS counts touched pages only, which is what an allocation costs in practice;
    peaks shorter than the sampling period can be missed (tensors this size live far longer).

Examples:
  python tools/bench_kernels.py --preset cpu --csv bench_cpu.csv        # the BENCHMARKS.md CPU row set
  python tools/bench_kernels.py --preset qwen3 --device cuda --dtype bfloat16
  python tools/bench_kernels.py --N 512 --H 256 --V 32000 --modes full --repeats 3
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import math
import os
import statistics
import sys
import threading
import time

import torch

from atesd_mc.flops import device_name
from atesd_mc.kernels import divergence_loss, fused_linear_divergence_loss
from atesd_mc.kernels.reference import divergence_loss_ref

QWEN3_V = 151_936
PRESETS = {  # (N, H, V) shapes
    "cpu": [(2048, 256, QWEN3_V)],
    "qwen3": [(4096, 2048, QWEN3_V), (4096, 4096, QWEN3_V), (16384, 4096, QWEN3_V)],
    "small": [(256, 128, 32_000)],
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------
# Providers: each returns a closure computing the loss from the prepared inputs.
# ------------------------------------------------------------------------------------------------
def naive_fused_linear(hs, ht, w, kind, beta):
    zs = (hs @ w.t()).float()
    with torch.no_grad():
        zt = (ht @ w.t()).float()
    return divergence_loss_ref(zs, zt, kind=kind, beta=beta, reduction="mean")


def liger_fused_linear(kind, beta):
    if kind != "jsd":
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None
    mod = LigerFusedLinearJSD(jsd_beta=beta, temperature=1.0)
    return lambda hs, ht, w: mod(hs, w, ht, w)


def providers(kernel, kind, beta, device):
    if kernel == "fused_linear":
        out = {"naive": lambda hs, ht, w: naive_fused_linear(hs, ht, w, kind, beta),
               "fused": lambda hs, ht, w: fused_linear_divergence_loss(hs, ht, w, kind=kind, beta=beta)}
        liger = liger_fused_linear(kind, beta) if device.type == "cuda" else None
        if liger is not None:
            out["liger"] = liger
        return out
    return {"naive": lambda zs, zt: divergence_loss_ref(zs.float(), zt.float(), kind=kind, beta=beta),
            "ours": lambda zs, zt: divergence_loss(zs, zt, kind=kind, beta=beta)}


def make_inputs(kernel, n, h, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kernel == "fused_linear":
        hs = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
        ht = torch.randn(n, h, generator=g).to(device, dtype)
        w = (torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)).to(device, dtype).requires_grad_()
        return (hs, ht, w)
    zs = (torch.randn(n, v, generator=g) * 2).to(device, dtype).requires_grad_()
    zt = (torch.randn(n, v, generator=g) * 2).to(device, dtype)
    return (zs, zt)


# ------------------------------------------------------------------------------------------------
# Measurement.
# ------------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_heap():
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


class RssPeak:
    """Peak RSS above the RSS at entry, sampled by a background thread (CPU memory)."""

    def __init__(self, period_s=0.0005):
        import psutil

        self.proc, self.period = psutil.Process(), period_s
        self.base = self.peak = 0
        self._stop = threading.Event()

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def __enter__(self):
        _release_heap()
        self.base = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra_mib(self):
        return (self.peak - self.base) / 2**20


def _one_run(fn, inputs, mode, device, timed_region):
    """Prepare (zero grads, untimed forward for bwd), then run the timed region inside `timed_region`."""
    for x in inputs:
        x.grad = None
    loss = fn(*inputs) if mode == "bwd" else None
    _sync(device)
    with timed_region():
        if mode == "fwd":
            loss = fn(*inputs)
        elif mode == "bwd":
            loss.backward()
        else:
            fn(*inputs).backward()
        _sync(device)
    del loss


def _timer(sink):
    class Timer:
        def __enter__(self):
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            sink.append((time.perf_counter() - self.t0) * 1e3)
    return Timer


def _peak_mib(fn, inputs, mode, device):
    if device.type == "cuda":
        holder = {}

        class CudaPeak:
            def __enter__(self):
                torch.cuda.reset_peak_memory_stats(device)
                holder["base"] = torch.cuda.memory_allocated(device)

            def __exit__(self, *exc):
                holder["mib"] = (torch.cuda.max_memory_allocated(device) - holder["base"]) / 2**20

        _one_run(fn, inputs, mode, device, CudaPeak)
        return holder["mib"]
    probe = RssPeak()
    _one_run(fn, inputs, mode, device, lambda: probe)
    return probe.extra_mib


def _is_oom(err: BaseException) -> bool:
    msg = str(err).lower()
    return isinstance(err, MemoryError) or "out of memory" in msg or "can't allocate memory" in msg


def measure(provs, inputs, mode, device, warmup, repeats):
    """{provider: (p50, p20, p80, peak MiB)}. Providers run interleaved, round by round, so a machine whose
    load drifts (the dev box is shared) biases none of them; then one untimed memory run each. A provider
    that runs out of memory is reported with NaNs (e.g. naive at N=16384, V=151,936) and dropped."""
    times = {name: [] for name in provs}
    failed = set()
    for _ in range(warmup + repeats):
        for name, fn in provs.items():
            if name in failed:
                continue
            try:
                _one_run(fn, inputs, mode, device, _timer(times[name]))
            except (RuntimeError, MemoryError) as err:
                if not _is_oom(err):
                    raise
                failed.add(name)
                print(f"# {name} {mode}: out of memory", file=sys.stderr, flush=True)
                _release_heap()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    out = {}
    nan = float("nan")
    for name, fn in provs.items():
        if name in failed:
            out[name] = (nan, nan, nan, nan)
            continue
        ts = times[name][warmup:]
        q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else ts * 9
        out[name] = (statistics.median(ts), q[1], q[7], _peak_mib(fn, inputs, mode, device))
    return out


# ------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", default="fused_linear", help="comma list: fused_linear,divergence")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="shape set (overrides --N/--H/--V)")
    ap.add_argument("--N", type=int, nargs="+", default=[2048])
    ap.add_argument("--H", type=int, nargs="+", default=[256])
    ap.add_argument("--V", type=int, nargs="+", default=[QWEN3_V])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kind", default="jsd", choices=["forward_kl", "reverse_kl", "jsd"])
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--modes", default="fwd,bwd,full")
    ap.add_argument("--providers", default=None, help="comma list to restrict providers (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--csv", default=None, help="append rows to this CSV file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    shapes = PRESETS[args.preset] if args.preset else [(n, h, v) for n in args.N for h in args.H for v in args.V]
    dev_name = device_name(device)
    rows = []
    for kernel in args.kernels.split(","):
        for n, h, v in shapes:
            inputs = make_inputs(kernel, n, h, v, dtype, device)
            provs = providers(kernel, args.kind, args.beta, device)
            if args.providers:
                provs = {k: f for k, f in provs.items() if k in args.providers.split(",")}
            for mode in args.modes.split(","):
                for name, (p50, p20, p80, peak) in measure(provs, inputs, mode, device, args.warmup,
                                                          args.repeats).items():
                    row = dict(kernel=f"{kernel}_{args.kind}", provider=name, mode=mode, N=n,
                               H=h if kernel == "fused_linear" else "", V=v, dtype=args.dtype, device=dev_name,
                               ms_p50=round(p50, 2), ms_p20=round(p20, 2), ms_p80=round(p80, 2),
                               peak_mib=round(peak, 1))
                    rows.append(row)
                    print(",".join(str(x) for x in row.values()), flush=True)
            del inputs
            _release_heap()
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                wr.writeheader()
            wr.writerows(rows)
    print_table(rows)


def print_table(rows):
    """Markdown table; ratios naive / provider (same kernel, shape and mode, this run): > 1 is better."""
    base = {(r["kernel"], r["mode"], r["N"], r["H"], r["V"]): r for r in rows if r["provider"] == "naive"}
    print("\n| kernel | provider | mode | N | H | V | dtype | ms p50 (p20-p80) | peak MiB | speed-up vs naive | "
          "memory saving vs naive |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base.get((r["kernel"], r["mode"], r["N"], r["H"], r["V"]))
        ok = b and not math.isnan(b["ms_p50"]) and not math.isnan(r["ms_p50"])
        t_ratio = f"{b['ms_p50'] / r['ms_p50']:.2f}x" if ok else "-"
        if not ok:  # no baseline, or a provider ran out of memory
            m_ratio = "-"
        elif r["peak_mib"] < 1.0:  # nothing measurable (the fused backward only rescales stored grads)
            m_ratio = "~0 MiB"
        else:
            m_ratio = f"{b['peak_mib'] / r['peak_mib']:.1f}x"
        print(f"| {r['kernel']} | {r['provider']} | {r['mode']} | {r['N']} | {r['H']} | {r['V']} | {r['dtype']} | "
              f"{r['ms_p50']} ({r['ms_p20']}-{r['ms_p80']}) | {r['peak_mib']} | {t_ratio} | {m_ratio} |")


if __name__ == "__main__":
    main()
