#!/usr/bin/env bash
# One-shot check of atesd-mc on one H100/H200 machine with no package registry (torch + triton on the
# image; megatron-core, zarr and math-verify carried as wheels in .gpu_bundle/, made here beforehand
# by `bash tools/prepare_gpu_bundle.sh`). Within 480 s (8 minutes), most important step first; each
# step has its own cap (the caps add up to <= 480 s, `--plan` lists them) and a global deadline
# cuts every step to what is left, so the summary always prints:
#
#   install_bundle       the bundle's wheels into a temporary --target folder put on PYTHONPATH
#   environment          python, torch, device, triton, megatron-core (version and where it imports
#                        from), transformer-engine (version, or why it does not import), the layer
#                        spec `auto` resolves to, zarr, math-verify, the bundle's commit
#   tiny_train_save      tiny config, 3 trainer steps, bf16, EMA teacher, --save
#   tiny_resume_load     --load that checkpoint into a new run dir, 2 more steps (4-5)
#   tiny_cpu_checkpoint_resume         resume the bundle's checkpoint made on CPU (step 2), step 3
#   tiny_cpu_checkpoint_finetune_lora  --finetune from it with LoRA r=8 (teacher = adapters off), 2 steps
#   qwen3_1p7b_lora_save examples/qwen3_1p7b.yaml (28 layers, 2048 wide, vocab 151,936, LoRA r=64, bf16),
#                        random weights, the bundle's tokenizer and GSM8K/AIME24 stores, 3 steps, --save
#   qwen3_1p7b_lora_load --load it, 1 more step with --inference-engine megatron (rollouts and
#                        evaluation through megatron's layers, i.e. TE's when it imports)
#   aot_native           every Triton specialisation compiled for this GPU's own architecture and loaded
#                        (python -m atesd_mc.kernels.aot --arch native --load): registers, spills, shared
#                        memory, and each kernel's first-call (cold compile) time
#   kernel_tests         tests/test_kernel_{divergence,fused_linear,masked_reference}.py + test_triton_path.py, compiled Triton
#   bench_kernels        fused vs naive output-layer divergence, N=8192, H=4096, V=151,936, bf16
#   throughput_qwen3_1p7b                  tools/bench_throughput.py, TP=1, stage by stage
#   throughput_qwen3_1p7b_swapped_engines  the same with rollouts through megatron, training through lean
#
# Every trainer step then checks its run: metrics.jsonl holds exactly the expected steps, each with a
# finite loss and grad norm and not skipped, and the checkpoint tracker names the last step. An
# out-of-memory error is a failure (status oom). PASS: every step ran ok, except the last three
# (timings), which may be skipped when the deadline leaves no time for them.
# Files go to $OUT when set (the device tool's folder), else --out DIR, else a new /tmp folder, at
# most 8: gpu_check.log, summary.md, summary.json (environment, steps, per-step losses and grad
# norms, layer spec and engine per run, AOT per-kernel compile times, timings), aot_native.json,
# bench_kernels.csv, throughput.csv. Exit status 0 on PASS, else 1.
#
# Usage:
#   bash tools/prepare_gpu_bundle.sh         # here, once per code change (wheels are kept)
#   bash tools/gpu_check.sh                  # on the GPU machine, with .gpu_bundle/ carried along
#   bash tools/gpu_check.sh --cpu-dry-run    # the same steps on CPU at tiny sizes (CI runs this)
# Options: --bundle DIR (default <repo>/.gpu_bundle), --out DIR, --budget SECONDS (default 480),
#   --only A,B / --skip A,B (step names; a partial run says so), --with-8b (add the 8B throughput last,
#   if time is left), --plan (print the steps and caps, run nothing),
#   --make-cpu-checkpoint DIR (what prepare_gpu_bundle.sh calls: the tiny checkpoint on CPU).
# --cpu-dry-run: CUDA hidden, OMP_NUM_THREADS=1, caps x20 (there they only guard against a hang: the dry
#   run checks the logic, and a loaded CI box must not time out). A missing bundle is prepared into a
#   temporary folder without wheels (prepare_gpu_bundle.sh --no-wheels); the bundle's wheels, if any, are
#   unpacked for cp312 but not imported; the Qwen3 run is shrunk to 2 layers, 64 wide, vocab 4,096; AOT
#   compiles for sm_90 (no GPU to ask); the kernel test files are byte-compiled only (CI runs them); the
#   timings use the tiny model. Environment: PYTHON (default python3).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# name  cap (s)  required|timing; in run order, most important first. Caps add up to <= 480.
PLAN=(
  "install_bundle 15 required"
  "environment 25 required"
  "tiny_train_save 40 required"
  "tiny_resume_load 30 required"
  "tiny_cpu_checkpoint_resume 30 required"
  "tiny_cpu_checkpoint_finetune_lora 25 required"
  "qwen3_1p7b_lora_save 65 required"
  "qwen3_1p7b_lora_load 50 required"
  "aot_native 35 required"
  "kernel_tests 55 required"
  "bench_kernels 30 timing"
  "throughput_qwen3_1p7b 45 timing"
  "throughput_qwen3_1p7b_swapped_engines 30 timing"
)
PLAN_LIMIT=480
EXTRA_8B="throughput_qwen3_8b 60 timing"
DRY=0 BUDGET=$PLAN_LIMIT OUTDIR="${OUT:-}" BUNDLE="$REPO/.gpu_bundle" ONLY="" SKIP="" WITH_8B=0 PLAN_ONLY=0
MAKE_CKPT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --bundle) BUNDLE="$2"; shift ;;
    --out) OUTDIR="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --only) ONLY=",$2,"; shift ;;
    --skip) SKIP=",$2,"; shift ;;
    --with-8b) WITH_8B=1 ;;
    --plan) PLAN_ONLY=1 ;;
    --make-cpu-checkpoint) MAKE_CKPT="$2"; shift ;;
    -h|--help) sed -n '2,50p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ $WITH_8B = 1 ] && PLAN+=("$EXTRA_8B")
PY="${PYTHON:-python3}"
SCALE=$([ $DRY = 1 ] && echo 20 || echo 1)  # dry run: caps only guard against hangs
RESERVE=8   # seconds kept for the summary
MIN_STEP=10 # a step with less than this left is skipped

plan_field() {  # plan_field NAME 2|3: the step's cap (2) or kind (3)
  local row name cap kind
  for row in "${PLAN[@]}"; do
    read -r name cap kind <<< "$row"
    if [ "$name" = "$1" ]; then
      if [ "$2" = 2 ]; then echo "$cap"; else echo "$kind"; fi
      return 0
    fi
  done
  return 1
}

print_plan() {
  local row total=0
  printf '%-36s %5s  %s\n' step cap kind
  for row in "${PLAN[@]}"; do
    set -- $row
    printf '%-36s %5s  %s\n' "$1" "$2" "$3"
    [ "$1" = "${EXTRA_8B%% *}" ] || total=$((total + $2))
  done
  echo "total ${total}s of caps (limit ${PLAN_LIMIT}s; --with-8b is extra and runs only on time left)"
  [ $total -le $PLAN_LIMIT ]
}

# The tiny config's flags: 3 steps are seconds on any device. 2 micro-batches per step (gradient
# accumulation), bf16 weights with fp32 main parameters in the optimizer, the EMA teacher (the one
# teacher kept as separate parameters and saved in the checkpoint). The bundle's CPU checkpoint is
# made with exactly these (--make-cpu-checkpoint), so the GPU can resume it.
TINY_ARGS=(--config examples/tiny_arith.yaml --params-dtype bf16 --teacher-mode ema --warm-start-iters 0
  --micro-batch-size 2 --global-batch-size 4 --max-new-tokens 16 --eval-size 2 --eval-samples 1
  --eval-max-new-tokens 16 --probe-size 4 --synthetic-train-size 256 --synthetic-eval-size 8
  --save-interval 0 --log-interval 1 --no-tensorboard --no-progress-bar)

qwen3_args() {  # the Qwen3-1.7B LoRA recipe with random weights, on the bundle's tokenizer and stores
  Q17_ARGS=(--config examples/qwen3_1p7b.yaml --name qwen3_1p7b_check --data-path "$BUNDLE/gsm8k"
    --tokenizer "$BUNDLE/qwen3_tokenizer" --eval-data-path "$BUNDLE/aime24" --no-finetune
    --vocab-size 151936 --warm-start-iters 0 --micro-batch-size 2 --global-batch-size 4
    --max-new-tokens 32 --eval-size 2 --eval-samples 1 --eval-max-new-tokens 32 --probe-size 4
    --save-interval 0 --log-interval 1 --no-tensorboard --no-progress-bar)
  if [ $DRY = 1 ]; then  # same recipe, CPU-sized (the vocabulary still larger than the tokenizer's)
    Q17_ARGS+=(--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4
      --num-query-groups 2 --kv-channels 16 --lora-rank 8 --lora-alpha 16 --vocab-size 4096
      --max-new-tokens 8 --eval-max-new-tokens 8)
  fi
}

selected() {
  case "$ONLY" in "") ;; *",$1,"*) ;; *) return 1 ;; esac
  case "$SKIP" in *",$1,"*) return 1 ;; esac
  return 0
}

record() {  # record NAME STATUS SECONDS NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(plan_field "$1" 2)" "$(plan_field "$1" 3)" "$4" >> "$STEPS"
}

# step NAME COMMAND...: under timeout (its cap, or what the deadline leaves), output also to
# logs/NAME.log. NOTE (if set) goes to the summary.
step() {
  local name=$1 cap left lim t0 rc status=ok
  shift
  if ! selected "$name"; then
    record "$name" deselected 0 "--only/--skip"; NOTE=""; return 0
  fi
  cap=$(( $(plan_field "$name" 2) * SCALE ))
  left=$((DEADLINE - SECONDS - RESERVE))
  if [ "$left" -lt $MIN_STEP ]; then
    echo "== $name: skipped (time budget spent)"
    record "$name" skipped 0 "time budget"; NOTE=""; return 0
  fi
  lim=$((cap < left ? cap : left)); t0=$SECONDS
  echo; echo "== $name (limit ${lim}s, $((SECONDS - START))s elapsed)"; echo "\$ $*"
  timeout --kill-after=10 "$lim" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=timeout
  elif [ "$rc" -ne 0 ] && grep -qiE "out of memory|OutOfMemoryError" "$LOGS/$name.log"; then
    status=oom
  elif [ "$rc" -ne 0 ]; then
    status="failed(rc=$rc)"
  fi
  echo "== $name: $status in $((SECONDS - t0))s"
  record "$name" "$status" "$((SECONDS - t0))" "${NOTE:-}"; NOTE=""
  [ "$status" = ok ]
}

fail_step() {  # fail_step NAME WHY: a step that cannot start (what it needs is missing)
  selected "$1" || { record "$1" deselected 0 "--only/--skip"; return 0; }
  echo "== $1: failed ($2)"
  record "$1" "failed" 0 "$2"
}

# train NAME RUN_DIR FIRST LAST TRAINER_ARGS...: one trainer launch (--save RUN_DIR --train-iters
# LAST), then check_run.py on its metrics.jsonl and checkpoint
train() {
  local name=$1 run=$2 first=$3 last=$4
  shift 4
  step "$name" bash -c '"$PY" tools/pretrain_atesd.py --save "$2" --train-iters "$4" "${@:5}" &&
    "$PY" "$WORK/check_run.py" "$1" "$2" "$3" "$4" "$WORK/runs.jsonl"' _ "$name" "$run" "$first" "$last" "$@"
}


write_helpers() {  # the Python the steps run, into $WORK (nothing of the repo is installed)
  mkdir -p "$WORK/shim"
  # sitecustomize runs at every interpreter start (subprocesses and forked ranks included) when its
  # folder is on PYTHONPATH. It puts a finder first on sys.meta_path that resolves the one name
  # atesd_mc.kernels to $ATESD_REPO/kernels (setup.py's package_dir), then runs any sitecustomize
  # it shadows.
  cat > "$WORK/shim/sitecustomize.py" <<'PYEOF'
import importlib.util
import os
import sys

_KERNELS = os.path.join(os.environ.get("ATESD_REPO", ""), "kernels")


class _AtesdKernelsFinder:
    """atesd_mc.kernels -> <repo>/kernels (setup.py's package_dir mapping, without an install)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        init = os.path.join(_KERNELS, "__init__.py")
        if name != "atesd_mc.kernels" or not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[_KERNELS])

    @staticmethod
    def invalidate_caches():
        pass


sys.meta_path.insert(0, _AtesdKernelsFinder)


def _run_shadowed_sitecustomize():
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        folder = os.path.abspath(entry or os.getcwd())
        path = os.path.join(folder, "sitecustomize.py")
        if folder != here and os.path.isfile(path):
            with open(path) as f:
                code = compile(f.read(), path, "exec")
            exec(code, {"__name__": "sitecustomize", "__file__": path})
            return


_run_shadowed_sitecustomize()
PYEOF
  cat > "$WORK/env.py" <<'PYEOF'
"""environment step: versions and where they import from, transformer-engine's import status, the
layer spec `auto` resolves to. argv: repo, env.json to write, bundle dir, dry (0/1). Exits 1 when
something the trainer steps need is missing."""
import importlib
import importlib.metadata
import json
import os
import sys

repo, out, bundle, dry = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
problems = []
import torch

info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda}
if info["cuda"]:
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                gpu_mem_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
else:
    info.update(device="cpu", gpu_mem_gib=0, gpus=0)
    if not dry:
        problems.append("torch sees no CUDA device (use --cpu-dry-run on CPU machines)")
import triton

info["triton"] = triton.__version__
import megatron.core

info["megatron_core"] = getattr(megatron.core, "__version__", "?")
info["megatron_core_from"] = os.path.dirname(os.path.dirname(os.path.realpath(megatron.core.__file__)))
try:  # any exception: a TE build that does not match this torch fails with more than ImportError
    import transformer_engine
    import transformer_engine.pytorch  # noqa: F401

    info["transformer_engine"] = getattr(transformer_engine, "__version__", "?")
except Exception as e:  # noqa: BLE001 - the reason is the record
    info["transformer_engine"] = None
    info["transformer_engine_error"] = (f"{type(e).__name__}: {e}".splitlines() or ["?"])[0][:300]
from atesd_mc.model.spec import resolve_impl

info["layer_spec_auto"] = resolve_impl("auto")
for module, dist in (("zarr", "zarr"), ("math_verify", "math-verify")):  # lazily imported by training
    try:
        importlib.import_module(module)
        info[module] = importlib.metadata.version(dist)
    except Exception as e:  # noqa: BLE001
        info[module] = None
        problems.append(f"{module} does not import ({type(e).__name__}: {e}); the bundle carries it")
import atesd_mc
import atesd_mc.kernels

info["atesd_mc"] = os.path.dirname(os.path.realpath(atesd_mc.__file__))
info["atesd_mc.kernels"] = os.path.dirname(os.path.realpath(atesd_mc.kernels.__file__))
if info["atesd_mc.kernels"] != os.path.join(os.path.realpath(repo), "kernels"):
    problems.append(f"atesd_mc.kernels resolves to {info['atesd_mc.kernels']}, not this repo's kernels/")
manifest = os.path.join(bundle, "MANIFEST.json")
info["bundle"] = json.load(open(manifest)) if os.path.exists(manifest) else None
for k, v in info.items():
    print(f"  {k:20s} {v}")
with open(out, "w") as f:
    json.dump(info, f, indent=1)
for p in problems:
    print(f"gpu_check: {p}")
sys.exit(1 if problems else 0)
PYEOF
  cat > "$WORK/check_run.py" <<'PYEOF'
"""After a trainer launch: metrics.jsonl holds exactly steps FIRST..LAST (a resumed run starts past 1),
each with a finite loss and grad norm and not skipped, and the checkpoint tracker names LAST (the
--save happened). argv: name, run dir, first, last, records file to append to. Exit 1 on a problem."""
import json
import math
import os
import sys

name, run, first, last, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
problems = []
path = os.path.join(run, "metrics.jsonl")
recs = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
steps = [r.get("step") for r in recs]
if steps != list(range(first, last + 1)):
    problems.append(f"metrics.jsonl has steps {steps}, expected {first}..{last}")
for r in recs:
    for key in ("loss", "grad_norm"):
        v = r.get(key)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            problems.append(f"step {r.get('step')}: {key} = {v}")
    if r.get("skipped"):
        problems.append(f"step {r.get('step')}: skipped (non-finite loss or gradient)")
tracker = os.path.join(run, "latest_checkpointed_iteration.txt")
saved = open(tracker).read().strip() if os.path.exists(tracker) else None
if saved != str(last):
    problems.append(f"checkpoint tracker says {saved}, expected {last}")
rows = [{k: r.get(k) for k in ("step", "loss", "grad_norm", "alpha", "skipped")} for r in recs]
for r in rows:
    print(f"  {name} step {r['step']}: loss {r['loss']}, grad norm {r['grad_norm']}, alpha {r['alpha']}")
with open(out, "a") as f:
    f.write(json.dumps({"name": name, "run_dir": run, "steps": rows, "checkpoint": saved,
                        "problems": problems}) + "\n")
for p in problems:
    print(f"gpu_check: {name}: {p}")
sys.exit(1 if problems else 0)
PYEOF
  write_summary_py
}

write_summary_py() {
  cat > "$WORK/summary.py" <<'PYEOF'
"""Last: summary.md / summary.json in the output folder and the RESULT line. argv: out dir, work dir,
elapsed s, budget s, mode. Exit 0 on PASS (a partial run by --only/--skip included), else 1."""
import csv
import glob
import json
import os
import re
import sys

out, work, elapsed, budget, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]


def load_json(path, default=None):
    return json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) else default


def rows(name):
    path = os.path.join(out, name)
    return list(csv.DictReader(open(path))) if os.path.exists(path) else []


env = load_json(os.path.join(work, "env.json"), {})
steps = [dict(zip(("name", "status", "seconds", "cap", "kind", "note"), line.rstrip("\n").split("\t")))
         for line in open(os.path.join(work, "steps.tsv")) if line.strip()]
runs = [json.loads(line) for line in open(os.path.join(work, "runs.jsonl"))] \
    if os.path.exists(os.path.join(work, "runs.jsonl")) else []


def from_log(name):
    """Layer spec and engine lines the trainer printed, and what it resumed or loaded."""
    path = os.path.join(work, "logs", f"{name}.log")
    text = open(path, errors="replace").read() if os.path.exists(path) else ""
    found = {k: re.search(p, text, re.M) for k, p in (("layer_spec", r"layer spec (\S+)"),
                                                      ("engine", r"^engine: (.*)$"),
                                                      ("resumed", r"^resumed from (\S+ at iteration \d+)"),
                                                      ("finetuned", r"^loaded weights from (\S+)"))}
    return {k: m.group(1) for k, m in found.items() if m}


for r in runs:
    r.update(from_log(r["name"]))


def te_line():
    if env.get("transformer_engine"):
        return f"transformer-engine {env['transformer_engine']}"
    return f"transformer-engine not importable ({env.get('transformer_engine_error', '?')})"


lines = ["# atesd-mc GPU check" + (" (cpu dry run)" if mode == "dry" else ""), "",
         f"device: {env.get('device', '?')} (sm {env.get('capability', '-')}, {env.get('gpu_mem_gib', '?')} GiB) | "
         f"python {env.get('python', '?')} | torch {env.get('torch', '?')} (CUDA {env.get('cuda_version')}) | "
         f"triton {env.get('triton', '?')} | megatron-core {env.get('megatron_core', '?')} from "
         f"{env.get('megatron_core_from', '?')} | {te_line()} | layer spec (auto): {env.get('layer_spec_auto', '?')} "
         f"| zarr {env.get('zarr')} | math-verify {env.get('math_verify')}",
         f"bundle: {(env.get('bundle') or {}).get('commit', 'none')}"
         f"{' (dirty tree)' if (env.get('bundle') or {}).get('dirty') else ''} | {elapsed} s of {budget} s", "",
         "| step | status | seconds | cap | kind | note |", "|---|---|---|---|---|---|"]
lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['cap']} | {s['kind']} | {s['note']} |" for s in steps]
if runs:
    lines += ["", "Trainer runs (every loss and grad norm finite and no step skipped, else the step failed):", "",
              "| run | layer spec | engine | from | steps | loss | grad norm | problems |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        st = r["steps"]
        fmt = lambda k: ", ".join(f"{x[k]:.4g}" if isinstance(x[k], float) else str(x[k]) for x in st)  # noqa: E731
        src = r.get("resumed") or (f"--finetune {r['finetuned']}" if r.get("finetuned") else "fresh")
        lines.append(f"| {r['name']} | {r.get('layer_spec', '?')} | {r.get('engine', '?')} | {src} | "
                     f"{','.join(str(x['step']) for x in st)} | {fmt('loss')} | {fmt('grad_norm')} | "
                     f"{'; '.join(r['problems']) or '-'} |")
aot = load_json(os.path.join(out, "aot_native.json"))
if aot:
    groups = {}
    for r in aot["rows"]:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    lines += ["", f"AOT compile for sm_{'/'.join(map(str, aot['archs']))}: per kernel, the cold (first-call) compile "
              "time of each specialisation, registers, spills, shared memory:", "",
              "| kernel | arch | specialisations | first-call compile total s | worst s | max regs (driver) | "
              "max spill st/ld B (driver local B) | max smem B | beyond limits |", "|---|---|---|---|---|---|---|---|---|"]
    for (k, a), rs in sorted(groups.items()):
        t = [r.get("compile_s") or 0.0 for r in rs]
        mx = lambda key: max((r.get(key) or 0) for r in rs)  # noqa: E731
        drv = lambda key: f" ({mx(key)})" if any(key in r for r in rs) else ""  # noqa: E731 - --load only
        bad = sum(bool(r.get("violations")) for r in rs)
        lines.append(f"| {k} | sm_{a} | {len(rs)} | {sum(t):.2f} | {max(t):.2f} | {mx('regs')}{drv('driver_regs')} | "
                     f"{mx('spill_stores')}/{mx('spill_loads')}{drv('driver_local_bytes')} | {mx('smem')} | {bad} |")
kern = rows("bench_kernels.csv")
if kern:
    lines += ["", "Kernel benchmark (fused output-layer divergence vs materialised logits):", "",
              "| provider | mode | N | H | V | dtype | ms p50 | peak MiB | time vs naive | memory vs naive |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    naive = {(r["mode"], r["N"], r["H"], r["V"]): r for r in kern if r["provider"] == "naive"}
    for r in kern:
        b = naive.get((r["mode"], r["N"], r["H"], r["V"]))
        speed = f"{float(b['ms_p50']) / float(r['ms_p50']):.2f}x" if b and float(r["ms_p50"]) else "-"
        mem = f"{float(b['peak_mib']) / max(float(r['peak_mib']), 1e-9):.1f}x" if b else "-"
        lines.append(f"| {r['provider']} | {r['mode']} | {r['N']} | {r['H']} | {r['V']} | {r['dtype']} | "
                     f"{r['ms_p50']} | {r['peak_mib']} | {speed} | {mem} |")
thr = rows("throughput.csv")
if thr:
    lines += ["", "ATESD step throughput (per GPU; executed FLOPs, attention counted as full s^2):", "",
              "| model | stage | ms/step | tokens/s/GPU | TFLOP/s/GPU | MFU | peak GiB | roofline ms | status |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in thr:
        mfu = f"{100 * float(r['mfu']):.1f}%" if r.get("mfu") else "-"
        peak = f"{float(r['peak_mem_mib']) / 1024:.2f}" if r.get("peak_mem_mib") else "-"
        lines.append(f"| {r['model']} | {r['stage']} | {r['ms_per_step'] or '-'} | {r['tokens_per_s_per_gpu'] or '-'} | "
                     f"{r['tflops_per_gpu'] or '-'} | {mfu} | {peak} | {r.get('bound_ms') or '-'} | {r['status']} |")
failed = [s["name"] for s in steps if s["status"] not in ("ok", "skipped", "deselected")]
unrun = [s["name"] for s in steps if s["status"] == "skipped" and s["kind"] == "required"]
partial = [s["name"] for s in steps if s["status"] == "deselected"]
ok = not failed and not unrun
result = "PASS" if ok else "FAIL"
if failed:
    result += f" (failed: {', '.join(failed)})"
if unrun:
    result += f" (not reached in the time budget: {', '.join(unrun)})"
if partial:
    result += f" (partial: --only/--skip left out {', '.join(partial)})"
lines += ["", f"RESULT: {result}"]
text = "\n".join(lines)
open(os.path.join(out, "summary.md"), "w").write(text + "\n")
throughput_runs = {os.path.basename(p)[:-5]: load_json(p) for p in sorted(glob.glob(os.path.join(work, "throughput_*.json")))}
json.dump({"mode": mode, "env": env, "steps": steps, "runs": runs, "aot_native": aot and {
               k: aot[k] for k in ("archs", "record_s", "compile_s")}, "bench_kernels": kern, "throughput": thr,
           "throughput_runs": throughput_runs, "pass": ok, "result": result, "seconds": elapsed, "budget": budget},
          open(os.path.join(out, "summary.json"), "w"), indent=1)
print("\n" + text)
sys.exit(0 if ok else 1)
PYEOF
}

bundle_has_data() {
  [ -f "$1/ckpt_tiny_cpu/latest_checkpointed_iteration.txt" ] && [ -d "$1/gsm8k" ] && [ -d "$1/aime24" ] &&
    [ -f "$1/qwen3_tokenizer/tokenizer.json" ]
}

install_bundle() {  # the wheels on PYTHONPATH (GPU); in the dry run, a bundle when none is here
  local wheels=("$BUNDLE"/wheels/*.whl)
  if [ $DRY = 1 ] && ! bundle_has_data "$BUNDLE"; then
    BUNDLE="$WORK/bundle"
    NOTE="dry run: no bundle here, prepared one without wheels"
    step install_bundle bash tools/prepare_gpu_bundle.sh --no-wheels --dest "$BUNDLE"
  elif [ $DRY = 1 ] && [ -f "${wheels[0]}" ]; then
    NOTE="dry run: the cp312 wheels unpacked, not imported"
    step install_bundle "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --target "$WORK/site_cp312" "${wheels[@]}"
  elif [ $DRY = 1 ]; then
    NOTE="dry run: the bundle has no wheels"
    step install_bundle true
  elif [ -f "${wheels[0]}" ]; then
    NOTE="${#wheels[@]} wheels"
    step install_bundle "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$WORK/site" "${wheels[@]}" && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    fail_step install_bundle "no wheels in $BUNDLE/wheels: run bash tools/prepare_gpu_bundle.sh here, carry .gpu_bundle"
  fi
}

tiny_steps() {
  local runs="$WORK/runs" ckpt="$WORK/ckpt_tiny_cpu" made
  if train tiny_train_save "$runs/tiny" 1 3 "${TINY_ARGS[@]}"; then
    train tiny_resume_load "$runs/tiny_resumed" 4 5 "${TINY_ARGS[@]}" --load "$runs/tiny"
  else
    fail_step tiny_resume_load "needs tiny_train_save"
  fi
  made=$(cat "$BUNDLE/ckpt_tiny_cpu/gpu_check_args.txt" 2>/dev/null)
  if ! bundle_has_data "$BUNDLE"; then
    fail_step tiny_cpu_checkpoint_resume "no $BUNDLE/ckpt_tiny_cpu: run bash tools/prepare_gpu_bundle.sh"
    fail_step tiny_cpu_checkpoint_finetune_lora "no $BUNDLE/ckpt_tiny_cpu"
    return
  elif [ "$made" != "${TINY_ARGS[*]}" ]; then
    fail_step tiny_cpu_checkpoint_resume "the bundle's checkpoint was made with other flags: rerun prepare_gpu_bundle.sh"
    fail_step tiny_cpu_checkpoint_finetune_lora "the bundle's checkpoint was made with other flags"
    return
  fi
  cp -r "$BUNDLE/ckpt_tiny_cpu" "$ckpt"  # a writable copy: the bundle may be read-only
  NOTE="bundle checkpoint at step $(cat "$ckpt/latest_checkpointed_iteration.txt"), made on CPU"
  train tiny_cpu_checkpoint_resume "$runs/tiny_cpu" 3 3 "${TINY_ARGS[@]}" --load "$ckpt"
  NOTE="weights of the CPU checkpoint into a LoRA run (the import -> --finetune path)"
  train tiny_cpu_checkpoint_finetune_lora "$runs/tiny_cpu_lora" 1 2 "${TINY_ARGS[@]}" --load "$ckpt" --finetune \
    --lora-rank 8 --lora-alpha 16 --teacher-mode lora_off
}

qwen3_steps() {
  local runs="$WORK/runs"
  qwen3_args
  if ! bundle_has_data "$BUNDLE"; then
    fail_step qwen3_1p7b_lora_save "no tokenizer/stores in $BUNDLE: run bash tools/prepare_gpu_bundle.sh"
    fail_step qwen3_1p7b_lora_load "no bundle"
    return
  fi
  [ $DRY = 1 ] && NOTE="dry run: 2 layers, 64 wide, vocab 4096"
  if train qwen3_1p7b_lora_save "$runs/qwen3_1p7b" 1 3 "${Q17_ARGS[@]}" --load ""; then
    NOTE="rollouts and evaluation through megatron's layers"
    train qwen3_1p7b_lora_load "$runs/qwen3_1p7b_resumed" 4 4 "${Q17_ARGS[@]}" --load "$runs/qwen3_1p7b" \
      --inference-engine megatron
  else
    fail_step qwen3_1p7b_lora_load "needs qwen3_1p7b_lora_save"
  fi
}

kernel_steps() {
  local tests=(tests/test_kernel_divergence.py tests/test_kernel_fused_linear.py tests/test_kernel_masked_reference.py
               tests/test_triton_path.py)
  if [ $DRY = 1 ]; then
    NOTE="dry run: sm_90 (no GPU to ask), not loaded"
    step aot_native env -u TRITON_INTERPRET "$PY" -m atesd_mc.kernels.aot --arch 90 --json "$OUTDIR/aot_native.json"
    NOTE="dry run: the files byte-compiled only (CI runs the tests)"
    step kernel_tests "$PY" -m py_compile "${tests[@]}"
    step bench_kernels "$PY" tools/bench_kernels.py --kernels fused_linear --kind forward_kl \
      --N 64 --H 32 --V 1000 --dtype float32 --device cpu --modes fwd,full --repeats 2 --warmup 1 \
      --csv "$OUTDIR/bench_kernels.csv"
  else
    step aot_native "$PY" -m atesd_mc.kernels.aot --arch native --load --json "$OUTDIR/aot_native.json"
    NOTE="compiled Triton; the AOT test is the step above"
    step kernel_tests "$PY" -m pytest -q -rfEs -p no:cacheprovider "${tests[@]}"
    step bench_kernels "$PY" tools/bench_kernels.py --kernels fused_linear --kind forward_kl \
      --N 8192 --H 4096 --V 151936 --dtype bfloat16 --device cuda --modes fwd,full --repeats 5 --warmup 2 \
      --csv "$OUTDIR/bench_kernels.csv"
  fi
}

throughput_steps() {  # no --allow-oom: an out-of-memory run fails its step
  local csv="$OUTDIR/throughput.csv"
  if [ $DRY = 1 ]; then  # the tiny model stands in: bf16 weights, LoRA, untied output layer
    local t=(--model tiny --tp 1 --batch 2 --prompt-len 8 --reference-len 8 --new-tokens 8 --steps 1 --warmup 0
      --threads 1 --csv "$csv")
    NOTE="dry run: tiny, bf16, LoRA r=8"
    step throughput_qwen3_1p7b "$PY" tools/bench_throughput.py "${t[@]}" --label tiny_lora_bf16 --lora-rank 8 \
      --lora-alpha 16 --untie-embeddings-and-output-weights --params-dtype bf16 --json "$WORK/throughput_tiny_lora.json"
    NOTE="dry run: tiny"
    step throughput_qwen3_1p7b_swapped_engines "$PY" tools/bench_throughput.py "${t[@]}" \
      --label tiny_swapped_engines --inference-engine megatron --train-engine megatron \
      --json "$WORK/throughput_tiny_swapped.json"
    [ $WITH_8B = 1 ] && step throughput_qwen3_8b "$PY" tools/bench_throughput.py "${t[@]}" --label tiny_8b_slot \
      --json "$WORK/throughput_tiny_8b_slot.json"
    return 0
  fi
  local q=(--tp 1 --batch 8 --prompt-len 256 --reference-len 512 --new-tokens 256 --csv "$csv")
  step throughput_qwen3_1p7b "$PY" tools/bench_throughput.py --model qwen3_1p7b "${q[@]}" --steps 2 --warmup 1 \
    --json "$WORK/throughput_qwen3_1p7b.json"
  # rollouts through megatron's layers instead of model/lean.py, the teacher's and student's passes
  # through lean's padding-free path instead of megatron's (TE) layers
  step throughput_qwen3_1p7b_swapped_engines "$PY" tools/bench_throughput.py --model qwen3_1p7b "${q[@]}" \
    --steps 1 --warmup 1 --label qwen3_1p7b_swapped_engines --inference-engine megatron --train-engine lean \
    --json "$WORK/throughput_qwen3_1p7b_swapped.json"
  [ $WITH_8B = 1 ] && step throughput_qwen3_8b "$PY" tools/bench_throughput.py --model qwen3_8b --tp 1 --batch 4 \
    --prompt-len 256 --reference-len 512 --new-tokens 256 --steps 1 --warmup 1 --csv "$csv" \
    --json "$WORK/throughput_qwen3_8b.json"
  return 0
}

setup() {  # environment of every step; the import path: the repo and the shim, nothing installed
  export PYTHONUNBUFFERED=1 PY WORK ATESD_REPO="$REPO"
  if [ $DRY = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""          # CPU even where a GPU exists
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  else
    unset TRITON_INTERPRET                  # compiled Triton
    export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
  fi
  write_helpers
  export PYTHONPATH="$WORK/shim:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  cd "$REPO" || exit 2
}

main() {
  echo "gpu_check: repo $REPO | out $OUTDIR | mode $([ $DRY = 1 ] && echo cpu-dry-run || echo gpu) | budget ${BUDGET}s"
  rm -f "$OUTDIR"/{bench_kernels.csv,throughput.csv,aot_native.json,summary.md,summary.json}
  print_plan >/dev/null || { echo "gpu_check: the plan's caps exceed ${PLAN_LIMIT}s"; return 2; }
  install_bundle
  step environment "$PY" "$WORK/env.py" "$REPO" "$WORK/env.json" "$BUNDLE" "$DRY"
  [ $DRY = 0 ] && command -v nvidia-smi >/dev/null 2>&1 &&
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  tiny_steps
  qwen3_steps
  kernel_steps
  throughput_steps
  "$PY" "$WORK/summary.py" "$OUTDIR" "$WORK" "$((SECONDS - START))" "$BUDGET" "$([ $DRY = 1 ] && echo dry || echo gpu)"
}

make_cpu_checkpoint() {  # the tiny config's checkpoint at step 2, made on CPU, for the bundle
  local dest=$1 run="$WORK/cpu_run" step_dir
  DRY=1 setup
  "$PY" tools/pretrain_atesd.py "${TINY_ARGS[@]}" --train-iters 2 --save "$run" || return 1
  "$PY" "$WORK/check_run.py" make_cpu_checkpoint "$run" 1 2 "$WORK/runs.jsonl" || return 1
  step_dir=$(printf 'iter_%07d' "$(cat "$run/latest_checkpointed_iteration.txt")")
  rm -rf "$dest" && mkdir -p "$dest" || return 1
  cp -r "$run/$step_dir" "$run/latest_checkpointed_iteration.txt" "$dest/" || return 1
  printf '%s\n' "${TINY_ARGS[*]}" > "$dest/gpu_check_args.txt"
  echo "gpu_check: wrote $dest ($(du -sh "$dest" | cut -f1))"
}

if [ $PLAN_ONLY = 1 ]; then
  print_plan; exit $?
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/atesd_gpu_check_work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
if [ -n "$MAKE_CKPT" ]; then
  mkdir -p "$(dirname "$MAKE_CKPT")" && MAKE_CKPT="$(cd "$(dirname "$MAKE_CKPT")" && pwd)/$(basename "$MAKE_CKPT")"
  (make_cpu_checkpoint "$MAKE_CKPT"); exit $?
fi
[ -n "$OUTDIR" ] || OUTDIR="$(mktemp -d "${TMPDIR:-/tmp}/atesd_gpu_check.XXXXXX")"
mkdir -p "$OUTDIR" "$WORK/logs" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
BUNDLE="$(cd "$BUNDLE" 2>/dev/null && pwd || echo "$BUNDLE")"
STEPS="$WORK/steps.tsv" LOGS="$WORK/logs"
: > "$STEPS"
START=$SECONDS
DEADLINE=$((START + BUDGET * SCALE))
setup
main 2>&1 | tee "$OUTDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
