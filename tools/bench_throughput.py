"""Throughput of one ATESD step, stage by stage, on random weights (no download, no data).

Each step runs the trainer's own stage functions (atesd_mc/stages.py, as atesd_mc/steps.py's
distill_step calls them) on the trainer's own runtime (atesd_mc/runtime.py), on synthetic
fixed-length sequences:

  rollout    atesd_mc.generation.generate: KV-cache sampling of --new-tokens tokens after a
             --prompt-len prompt, for --batch prompts (no EOS, so every rollout has the full length)
  teacher    no-grad forward of the decoder body over [teacher context ; rollout], the context being
             the prompt plus --reference-len revealed reference tokens (LoRA off / frozen copy)
  student    forward + backward over [prompt ; rollout] with the fused output-layer divergence
             (atesd_mc.losses.distill_loss) on the rollout tokens
  optimizer  megatron's optimizer step (AdamW, grad clipping) and LR schedule

--warmup steps run first and are not timed. For each stage it reports time per step, tokens/s per
GPU, TFLOP/s per GPU (executed FLOPs from atesd_mc.flops.step_flops: full s² attention unless
--causal-flops), MFU on GPUs with a known peak (atesd_mc.flops.PEAK_TFLOPS) and peak memory:
torch.cuda.max_memory_allocated on GPU, the process's peak RSS (VmHWM, reset per stage) on CPU. The
"total" row sums the stages; its tokens are the rollout tokens trained on per step. The rollout row
also gives a roofline bound on GPUs with a known HBM bandwidth: the decode steps' weight + KV-cache
bytes over the bandwidth (each TP rank reads its shard), plus the prefill FLOPs over the peak.

--batch is per data-parallel replica; a step processes dp x batch prompts. Token and FLOP counts
are global and divided by the world size for the per-GPU numbers.

  python tools/bench_throughput.py --model tiny --steps 3 --warmup 1 --csv bench.csv
  python tools/bench_throughput.py --model qwen3_1p7b --batch 8 --prompt-len 256 --new-tokens 256
  torchrun --nproc_per_node=8 tools/bench_throughput.py --model qwen3_8b --tp 2
  python tools/bench_throughput.py --model qwen3_4b --lora-rank 0   # any config flag overrides the preset
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRESETS = {
    "tiny": "examples/tiny_arith.yaml",
    "qwen3_1p7b": "examples/qwen3_1p7b.yaml",
    "qwen3_4b": "examples/qwen3_4b.yaml",
    "qwen3_8b": "examples/qwen3_8b.yaml",
}
STAGES = ("rollout", "teacher", "student", "optimizer")
CSV_FIELDS = ["model", "device", "n_gpus", "tp", "pp", "dp", "dtype", "batch", "micro_batch", "prompt_len",
              "reference_len", "new_tokens", "stage", "steps", "ms_per_step", "tokens_per_step",
              "tokens_per_s_per_gpu", "tflop_per_step", "tflops_per_gpu", "mfu", "peak_mem_mib", "bound_ms",
              "attention", "status"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Unknown flags go to the run config (e.g. --lora-rank 0, "
                                        "--transformer-impl local, --params-dtype bf16).")
    ap.add_argument("--model", default="tiny", choices=sorted(PRESETS), help="preset (examples/*.yaml)")
    ap.add_argument("--config", default="", help="any run-config YAML instead of a preset")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=8, help="prompts per data-parallel replica per step")
    ap.add_argument("--micro-batch", type=int, default=0, help="teacher/student micro-batch (0 = --batch)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128, help="rollout length")
    ap.add_argument("--reference-len", type=int, default=-1,
                    help="revealed reference tokens in the teacher context (default: --new-tokens)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU only: torch intra-op threads (0 = torch's default); 1 avoids OpenMP spinning "
                         "on a shared machine")
    ap.add_argument("--causal-flops", action="store_true",
                    help="count causal-half attention FLOPs (flash/TE) instead of the full s² default")
    ap.add_argument("--label", default="", help="name in the model column (default: the preset or config)")
    ap.add_argument("--csv", default="", help="append one row per stage to this CSV")
    ap.add_argument("--json", default="", help="write the run's settings and rows to this JSON file")
    ap.add_argument("--allow-oom", action="store_true",
                    help="on CUDA out-of-memory write status=oom rows and exit 0 (world 1)")
    args, rest = ap.parse_known_args(argv)
    if args.reference_len < 0:
        args.reference_len = args.new_tokens
    if args.micro_batch <= 0:
        args.micro_batch = args.batch
    for name in ("steps", "batch", "prompt_len", "new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch % args.micro_batch:
        ap.error("--micro-batch must divide --batch")
    return args, rest


def _name(args) -> str:
    return args.label or args.config or args.model


def load_config(args, rest, world: int):
    from atesd_mc.config_io import parse_config

    path = args.config or os.path.join(REPO, PRESETS[args.model])
    dp = max(1, world // (args.tp * args.pp))
    cfg = parse_config(["--config", path, "--seed", str(args.seed), "--tensor-model-parallel-size", str(args.tp),
                        "--pipeline-model-parallel-size", str(args.pp),
                        "--micro-batch-size", str(args.micro_batch),
                        "--global-batch-size", str(args.batch * dp), *rest])
    need = args.prompt_len + args.reference_len + args.new_tokens
    cfg.model.seq_length = max(cfg.model.seq_length, need)  # RoPE table covers the teacher context
    return cfg


# ------------------------------------------------------------------------------------------------
# Measurement helpers


class PeakMemory:
    """CUDA: max_memory_allocated since reset. CPU: the process's VmHWM (peak RSS), which Linux
    resets when "5" is written to /proc/self/clear_refs (falls back to the lifetime peak)."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def mib(self) -> float:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync() -> None:
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class StageTimer:
    def __init__(self):
        self.times = {s: [] for s in STAGES}
        self.peak = {s: 0.0 for s in STAGES}
        self.mem = PeakMemory()
        self.record = False

    @contextlib.contextmanager
    def __call__(self, stage: str):
        _sync()
        self.mem.reset()
        t0 = time.perf_counter()
        yield
        _sync()
        dt = time.perf_counter() - t0
        if self.record:
            self.times[stage].append(dt)
            self.peak[stage] = max(self.peak[stage], self.mem.mib())


# ------------------------------------------------------------------------------------------------
# The benchmark


class Bench:
    """The trainer's runtime (model, LoRA, DDP, optimizer, teacher, engine) on random weights."""

    def __init__(self, cfg, args):
        import torch

        from atesd_mc import distributed, engine
        from atesd_mc.model.qwen3 import build_stage, padded_vocab_size
        from atesd_mc.optim import count_params
        from atesd_mc.runtime import build_runtime

        self.cfg, self.args = cfg, args
        p = cfg.parallel
        self.info = distributed.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                           args.seed, p.distributed_backend, p.distributed_timeout_minutes)
        self.dp = cfg.validate_world(self.info.world_size)
        self.vocab = cfg.model.vocab_size or cfg.data.synthetic_vocab_size
        self.padded_vocab = padded_vocab_size(self.vocab, cfg.model.make_vocab_size_divisible_by, self.info.tp)
        model = build_stage(cfg.model, p, self.vocab)
        eng = engine.resolve(cfg.generation.inference_engine, cfg.train.train_engine, model)
        self.rt = build_runtime(cfg, self.info, eng, model, self.vocab, eos_id=None)
        self.params = count_params(self.rt.model)
        self.dtype = str(next(self.rt.model.parameters()).dtype).replace("torch.", "")
        self.torch = torch

    def _random(self, gen, n: int, length: int) -> list[list[int]]:
        return self.torch.randint(1, self.vocab, (n, length), generator=gen).tolist()

    def _pairs(self, prompts, contexts, rollouts) -> list:
        """Student [prompt ; rollout] and teacher [context ; rollout] micro-batches."""
        import torch

        from atesd_mc.batching import PairBatch, build_side

        dev, mb = self.rt.device, self.args.micro_batch
        pairs = []
        for i in range(0, self.args.batch, mb):
            c = slice(i, i + mb)
            student, ids = build_side(prompts[c], rollouts[c], dev)
            pairs.append(PairBatch(student=student, teacher=build_side(contexts[c], rollouts[c], dev)[0],
                                   rollout_ids=ids,
                                   rollout_lengths=torch.tensor([len(r) for r in rollouts[c]], device=dev)))
        return pairs

    def step(self, it: int, timer: StageTimer) -> None:
        import torch

        from atesd_mc import stages
        from atesd_mc.generation import SamplingParams

        a, rt, g = self.args, self.rt, self.cfg.generation
        gen = torch.Generator().manual_seed(a.seed * 1000 + it * 97 + self.info.dp_rank)
        prompts = self._random(gen, a.batch, a.prompt_len)
        contexts = [p + r for p, r in zip(prompts, self._random(gen, a.batch, a.reference_len))]
        params = SamplingParams(max_new_tokens=a.new_tokens, temperature=g.rollout_temperature, top_p=g.top_p,
                                top_k=g.top_k, eos_id=None)
        with timer("rollout"):
            rollouts = stages.rollouts(rt, prompts, params, gen).tokens
        assert all(len(r) == a.new_tokens for r in rollouts), "rollouts must have the synthetic length"
        pairs = self._pairs(prompts, contexts, rollouts)
        with timer("teacher"):
            h_teacher = stages.teacher_forward(rt, [p.teacher for p in pairs])
        with timer("student"):
            stages.distill_backward(rt, pairs, h_teacher, a.batch)
        with timer("optimizer"):
            stages.optimizer_update(rt, 0.0)

    def flops_and_tokens(self) -> tuple[dict, dict]:
        """Global FLOPs and tokens per step for each stage (all data-parallel replicas)."""
        from atesd_mc.flops import step_flops

        a, b = self.args, self.args.batch
        per_replica = step_flops(self.cfg.model, self.vocab, [a.prompt_len] * b, [a.new_tokens] * b,
                                 [a.prompt_len + a.reference_len] * b, padded_vocab=self.padded_vocab,
                                 causal=a.causal_flops)
        fl = {k: v * self.dp for k, v in per_replica.items()}
        fl["optimizer"] = 0.0
        tok = {"rollout": self.dp * b * a.new_tokens,
               "teacher": self.dp * b * (a.prompt_len + a.reference_len + a.new_tokens),
               "student": self.dp * b * (a.prompt_len + a.new_tokens), "optimizer": 0}
        return fl, tok

    def rollout_bound_ms(self, dev: str) -> float | None:
        """Roofline for one rank's rollout: decode bytes / HBM bandwidth + prefill FLOPs / peak."""
        from atesd_mc import flops

        bw, peak = flops.hbm_bandwidth(dev), flops.peak_tflops(dev)
        if bw is None or peak is None:
            return None
        a, m = self.args, self.cfg.model
        nbytes = 2 if self.dtype in ("bfloat16", "float16") else 4
        decode = flops.rollout_bandwidth_bound(m, self.padded_vocab, a.batch, a.prompt_len, a.new_tokens, nbytes,
                                               bw) / (self.info.tp * self.info.pp)
        prefill = flops.forward_flops(m, self.padded_vocab, [a.prompt_len] * a.batch, logit_tokens=a.batch)
        return 1e3 * (decode + prefill / (self.info.tp * self.info.pp) / (peak * 1e12))


def rows_from(bench: Bench, timer: StageTimer, dev: str, status: str = "ok") -> list[dict]:
    import torch
    import torch.distributed as dist

    from atesd_mc.flops import mfu

    a, info = bench.args, bench.info
    # every rank timed the same barriers; memory differs by rank (PP stages): take the maximum
    peaks = torch.tensor([timer.peak[s] for s in STAGES], dtype=torch.float64,
                         device="cuda" if torch.cuda.is_available() else "cpu")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    fl, tok = bench.flops_and_tokens()
    n = info.world_size
    base = dict(model=_name(a), device=dev, n_gpus=n, tp=info.tp, pp=info.pp, dp=bench.dp,
                dtype=bench.dtype, batch=a.batch, micro_batch=a.micro_batch, prompt_len=a.prompt_len,
                reference_len=a.reference_len, new_tokens=a.new_tokens,
                attention="causal" if a.causal_flops else "full", status=status)
    rows = []
    for i, s in enumerate(STAGES):
        ts = timer.times[s]
        sec = sum(ts) / len(ts) if ts else float("nan")
        rows.append(_row(base, s, len(ts), sec, tok[s], fl[s], float(peaks[i]), n, dev, mfu))
    rollout_bound = bench.rollout_bound_ms(dev)
    rows[0]["bound_ms"] = "" if rollout_bound is None else _sig(rollout_bound, 5)
    total_sec = sum(sum(timer.times[s]) / max(1, len(timer.times[s])) for s in STAGES)
    rows.append(_row(base, "total", min(len(timer.times[s]) for s in STAGES), total_sec, tok["rollout"],
                     sum(fl.values()), float(peaks.max()), n, dev, mfu))
    return rows


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _row(base, stage, steps, sec, tokens, fl, peak, n, dev, mfu_fn):
    ok = sec == sec and sec > 0
    util = mfu_fn(fl, sec, dev, n) if ok and fl else None
    return {**base, "stage": stage, "steps": steps, "ms_per_step": _sig(1e3 * sec, 5) if ok else "",
            "tokens_per_step": tokens, "tokens_per_s_per_gpu": _sig(tokens / sec / n, 5) if ok else "",
            "tflop_per_step": _sig(fl / 1e12, 6), "tflops_per_gpu": _sig(fl / sec / n / 1e12) if ok else "",
            "mfu": "" if util is None else round(util, 4), "peak_mem_mib": round(peak, 1), "bound_ms": ""}


def oom_rows(args, dev: str, where: str) -> list[dict]:
    return [{**{k: "" for k in CSV_FIELDS}, "model": _name(args), "device": dev, "stage": s,
             "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
             "status": f"oom in {where}"} for s in (*STAGES, "total")]


def print_report(rows: list[dict], header: list[str]) -> None:
    for line in header:
        print(line)
    print("\n| stage | ms/step | tokens/step | tokens/s/GPU | TFLOP/step | TFLOP/s/GPU | MFU | peak MiB | "
          "roofline ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['stage']} | {r['status']} | | | | | | | |")
            continue
        util = f"{100 * r['mfu']:.1f}%" if r["mfu"] != "" else "-"
        print(f"| {r['stage']} | {r['ms_per_step']} | {r['tokens_per_step']} | {r['tokens_per_s_per_gpu']} | "
              f"{r['tflop_per_step']} | {r['tflops_per_gpu']} | {util} | {r['peak_mem_mib']} | "
              f"{r['bound_ms'] if r['bound_ms'] != '' else '-'} |")
    sys.stdout.flush()


def write_outputs(args, rows: list[dict], settings: dict) -> None:
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        new = not os.path.exists(args.csv) or os.path.getsize(args.csv) == 0
        with open(args.csv, "a", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                wr.writeheader()
            wr.writerows(rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "rows": rows}, f, indent=2)


def main(argv=None) -> int:
    args, rest = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    from atesd_mc import distributed
    from atesd_mc.config import ConfigError

    if args.threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    try:
        world = distributed.launch_env(os.environ).world_size  # torchrun, srun or mpirun
        cfg = load_config(args, rest, world)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from atesd_mc.flops import device_name

    dev = device_name()
    oom_error = getattr(torch.cuda, "OutOfMemoryError", MemoryError)
    bench, stage = None, "model build"
    timer = StageTimer()
    try:
        bench = Bench(cfg, args)
        for it in range(args.warmup + args.steps):
            timer.record = it >= args.warmup
            stage = f"step {it}"
            bench.step(it, timer)
    except oom_error:
        if not args.allow_oom or world > 1:
            raise
        rows = oom_rows(args, dev, stage)
        print(f"bench_throughput: CUDA out of memory during {stage} ({_name(args)}, batch "
              f"{args.batch}, prompt {args.prompt_len}, new {args.new_tokens})", flush=True)
        write_outputs(args, rows, {"argv": sys.argv[1:], "status": "oom"})
        return 0
    rows = rows_from(bench, timer, dev)
    if bench.info.rank == 0:
        from atesd_mc.flops import param_count

        m, info = cfg.model, bench.info
        total, trainable = bench.params
        from atesd_mc.model.spec import resolve_impl

        header = [
            f"bench_throughput: {_name(args)} | {dev} | world {info.world_size} (tp {info.tp}, "
            f"pp {info.pp}, dp {bench.dp}) | {bench.dtype} | layer spec {resolve_impl(m.transformer_impl)}",
            f"model: {m.num_layers} layers, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, heads "
            f"{m.num_attention_heads}/{m.num_query_groups} kv, head_dim {m.kv_channels}, vocab {bench.vocab} "
            f"(padded {bench.padded_vocab}), {param_count(m, bench.vocab) / 1e9:.3f}B params "
            f"(this rank: {total / 1e6:.1f}M, trainable {trainable / 1e6:.2f}M), LoRA r={m.lora_rank}, "
            f"teacher {m.resolved_teacher_mode}",
            f"per replica and step: {args.batch} prompts x {args.prompt_len} tokens -> {args.new_tokens} new tokens; "
            f"teacher context {args.prompt_len + args.reference_len} + rollout; micro-batch {args.micro_batch}; "
            f"{args.steps} timed steps after {args.warmup} warm-up; attention FLOPs "
            f"{'causal half' if args.causal_flops else 'full s^2'}",
            bench.rt.engine.describe(),
        ]
        print_report(rows, header)
        settings = {"argv": sys.argv[1:], "model_config": {k: getattr(m, k) for k in m.__slots__},
                    "vocab": bench.vocab, "padded_vocab": bench.padded_vocab, "device": dev,
                    "params_total": param_count(m, bench.vocab), "params_this_rank": total,
                    "trainable_this_rank": trainable}
        write_outputs(args, rows, settings)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
