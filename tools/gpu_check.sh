#!/usr/bin/env bash
# One-shot check of atesd-mc on a single H100/H200 machine (torch + triton present, no internet),
# finishing within a time budget (default 450 s, under 8 minutes):
#
#   1. environment: python, torch, CUDA device, triton, megatron-core
#   2. megatron-core from wheels (.whl/ in the repo root or --wheels DIR) into a temporary
#      --target folder on PYTHONPATH, when it does not import already (or when --wheels is given)
#   3. import path: PYTHONPATH = the repo, plus a sitecustomize shim that maps atesd_mc.kernels to
#      the repo's kernels/ folder (what setup.py's package_dir does; nothing is pip-installed)
#   4. kernel tests: tests/test_kernel_*.py with compiled Triton on CUDA (no TRITON_INTERPRET)
#   5. tools/bench_kernels.py: fused vs naive output-layer divergence, N=8192, H=4096, V=151,936, bf16
#   6. tools/bench_throughput.py: qwen3_1p7b, TP=1 (rollout / teacher / student / optimizer)
#   7. tools/bench_throughput.py: qwen3_8b, TP=1, when the GPU has >= 70 GiB (OOM is reported, not fatal);
#      then qwen3_1p7b again with both engines swapped (--inference-engine megatron: rollouts through
#      megatron's layers; --train-engine lean: the student through atesd_mc/model/lean.py) if the
#      budget allows
#   8. summary table (also summary.md / summary.json)
#
# Every step runs under `timeout` with what is left of the budget, so the summary always prints.
# Files go to $OUT when set (the device tool's folder), else --out DIR, else a new /tmp folder:
# gpu_check.log, bench_kernels.csv, throughput.csv, throughput_<model>.json, summary.md, summary.json.
# Exit status 0 when every step passed (a skipped or out-of-memory 8B run still passes), else 1.
#
# Usage:
#   bash tools/gpu_check.sh                  # on the GPU machine, from anywhere
#   bash tools/gpu_check.sh --cpu-dry-run    # the same sequence on CPU with tiny shapes (CI box)
# Options: --wheels DIR (install every wheel in DIR, even if megatron-core imports), --out DIR,
#          --budget SECONDS, --no-8b. Environment: PYTHON (default python3).
# Preparing the wheels (on a machine with internet; see BENCHMARKS.md "GPU check"):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl megatron-core==0.19.2
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
WHEELS=""
RUN_8B=1
BUDGET=450
OUTDIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --wheels) WHEELS="$(cd "$2" && pwd)" || exit 2; shift ;;
    --out) OUTDIR="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --no-8b) RUN_8B=0 ;;
    -h|--help) sed -n '2,32p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$OUTDIR" ] || OUTDIR="$(mktemp -d "${TMPDIR:-/tmp}/atesd_gpu_check.XXXXXX")"
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/atesd_gpu_check_work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.tsv"
: > "$STEPS"
START=$SECONDS
DEADLINE=$((START + BUDGET))
RESERVE=15  # seconds kept for the summary

# step NAME CAP_SECONDS COMMAND...: run under timeout (min of CAP and what the budget has left)
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - SECONDS - RESERVE))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped (time budget spent)"
    printf '%s\tskipped\t0\ttime budget\n' "$name" >> "$STEPS"
    return 0
  fi
  local lim=$((cap < left ? cap : left)) t0=$SECONDS rc status=ok
  echo
  echo "== $name (limit ${lim}s, $((SECONDS - START))s elapsed)"
  echo "\$ $*"
  timeout --kill-after=10 "$lim" "$@"
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status=timeout
  elif [ $rc -ne 0 ]; then
    status="failed(rc=$rc)"
  fi
  echo "== $name: $status in $((SECONDS - t0))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "${NOTE:-}" >> "$STEPS"
  NOTE=""
  return 0
}

note_skip() {
  echo "== $1: skipped ($2)"
  printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$STEPS"
}

write_shim() {
  # sitecustomize runs at every interpreter start (subprocesses and forked ranks included) when its
  # folder is on PYTHONPATH. It puts a finder first on sys.meta_path that resolves the one name
  # atesd_mc.kernels to $ATESD_REPO/kernels, then runs any other sitecustomize it shadows.
  mkdir -p "$WORK/shim"
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
}

main() {
  echo "gpu_check: repo $REPO | out $OUTDIR | mode $([ $DRY = 1 ] && echo cpu-dry-run || echo gpu) | budget ${BUDGET}s"
  rm -f "$OUTDIR"/bench_kernels.csv "$OUTDIR"/throughput.csv "$OUTDIR"/throughput_*.json \
        "$OUTDIR"/summary.md "$OUTDIR"/summary.json
  export PYTHONUNBUFFERED=1
  if [ $DRY = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""          # CPU even where a GPU exists
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  else
    unset TRITON_INTERPRET                  # compiled Triton
    export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
  fi

  # 1-2. megatron-core
  local whl_dir="${WHEELS:-$REPO/.whl}"
  # (find_spec, not an import: importing megatron takes ~6 s of the budget)
  if [ -n "$WHEELS" ] || ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('megatron.core') is None)" \
      >/dev/null 2>&1; then
    if ls "$whl_dir"/megatron_core-*.whl >/dev/null 2>&1; then
      step install_wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --ignore-requires-python --target "$WORK/site" "$whl_dir"/*.whl
      export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    else
      echo "gpu_check: megatron-core does not import and $whl_dir has no megatron_core-*.whl (see --help)"
      printf 'install_wheels\tfailed(no wheel)\t0\t%s\n' "$whl_dir" >> "$STEPS"
    fi
  else
    note_skip install_wheels "megatron-core already importable"
  fi

  # 3. import path + shim
  export ATESD_REPO="$REPO"
  write_shim
  export PYTHONPATH="$WORK/shim:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  cat > "$WORK/env.py" <<'PYEOF'
import json, os, sys
import torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available()}
if info["cuda"]:
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), gpu_mem_gib=round(p.total_memory / 2**30, 1),
                gpus=torch.cuda.device_count(), cuda_version=torch.version.cuda)
else:
    info.update(device="cpu", gpu_mem_gib=0, gpus=0)
import triton
info["triton"] = triton.__version__
import megatron.core
info["megatron_core"] = getattr(megatron.core, "__version__", "?")
import atesd_mc, atesd_mc.kernels
kernels_dir = os.path.dirname(os.path.realpath(atesd_mc.kernels.__file__))
info["atesd_mc"] = os.path.dirname(os.path.realpath(atesd_mc.__file__))
info["atesd_mc.kernels"] = kernels_dir
for k, v in info.items():
    print(f"  {k:18s} {v}")
if kernels_dir != os.path.join(os.path.realpath(sys.argv[1]), "kernels"):
    sys.exit(f"atesd_mc.kernels resolves to {kernels_dir}, not this repo's kernels/")
json.dump(info, open(sys.argv[2], "w"))
PYEOF
  step environment 120 "$PY" "$WORK/env.py" "$REPO" "$WORK/env.json"
  if [ ! -s "$WORK/env.json" ]; then
    echo "gpu_check: the environment step failed; later steps will fail too"
  elif [ $DRY = 0 ] && ! grep -q '"cuda": true' "$WORK/env.json"; then
    echo "gpu_check: torch sees no CUDA device (use --cpu-dry-run on CPU machines)"
    printf 'cuda\tfailed(no device)\t0\t\n' >> "$STEPS"
  fi
  command -v nvidia-smi >/dev/null 2>&1 && [ $DRY = 0 ] && \
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader

  # 4. kernel tests
  cd "$REPO" || return 1
  local tests=(tests/test_kernel_*.py)
  step kernel_tests 240 "$PY" -m pytest -q -rfEs -p no:cacheprovider "${tests[@]}"

  # 5. kernel benchmark
  if [ $DRY = 1 ]; then
    step bench_kernels 120 "$PY" tools/bench_kernels.py --kernels fused_linear --kind forward_kl \
      --N 64 --H 32 --V 1000 --dtype float32 --device cpu --modes fwd,full --repeats 2 --warmup 1 \
      --csv "$OUTDIR/bench_kernels.csv"
  else
    step bench_kernels 150 "$PY" tools/bench_kernels.py --kernels fused_linear --kind forward_kl \
      --N 8192 --H 4096 --V 151936 --dtype bfloat16 --device cuda --modes fwd,full --repeats 5 --warmup 2 \
      --csv "$OUTDIR/bench_kernels.csv"
  fi

  # 6-7. throughput
  if [ $DRY = 1 ]; then
    step throughput_tiny 120 "$PY" tools/bench_throughput.py --model tiny --tp 1 --batch 2 --prompt-len 8 \
      --reference-len 8 --new-tokens 8 --steps 2 --warmup 1 --threads 1 \
      --csv "$OUTDIR/throughput.csv" --json "$OUTDIR/throughput_tiny.json"
    # stands in for the Qwen3 runs: bf16 weights (Float16Module), LoRA, teacher = adapters off, untied output
    step throughput_tiny_lora 120 "$PY" tools/bench_throughput.py --model tiny --tp 1 --batch 2 --prompt-len 8 \
      --reference-len 8 --new-tokens 8 --steps 2 --warmup 1 --threads 1 --label tiny_lora_bf16 --lora-rank 8 \
      --lora-alpha 16 --untie-embeddings-and-output-weights --params-dtype bf16 --csv "$OUTDIR/throughput.csv" --json "$OUTDIR/throughput_tiny_lora.json"
    # stands in for the swapped-engine 1.7B run (on CPU auto is lean for both, so swapped = megatron)
    step throughput_tiny_swapped_engines 120 "$PY" tools/bench_throughput.py --model tiny --tp 1 --batch 2 \
      --prompt-len 8 --reference-len 8 --new-tokens 8 --steps 2 --warmup 1 --threads 1 --label tiny_swapped_engines \
      --inference-engine megatron --train-engine megatron --csv "$OUTDIR/throughput.csv" \
      --json "$OUTDIR/throughput_tiny_swapped.json"
  else
    step throughput_qwen3_1p7b 180 "$PY" tools/bench_throughput.py --model qwen3_1p7b --tp 1 --batch 8 \
      --prompt-len 256 --reference-len 512 --new-tokens 256 --steps 3 --warmup 1 --allow-oom \
      --csv "$OUTDIR/throughput.csv" --json "$OUTDIR/throughput_qwen3_1p7b.json"
    local mem
    mem=$("$PY" -c "import json; print(int(json.load(open('$WORK/env.json')).get('gpu_mem_gib', 0)))" 2>/dev/null || echo 0)
    if [ $RUN_8B = 0 ]; then
      note_skip throughput_qwen3_8b "--no-8b"
    elif [ "$mem" -lt 70 ]; then
      note_skip throughput_qwen3_8b "GPU has ${mem} GiB (< 70)"
    else
      step throughput_qwen3_8b 180 "$PY" tools/bench_throughput.py --model qwen3_8b --tp 1 --batch 4 \
        --prompt-len 256 --reference-len 512 --new-tokens 256 --steps 2 --warmup 1 --allow-oom \
        --csv "$OUTDIR/throughput.csv" --json "$OUTDIR/throughput_qwen3_8b.json"
    fi
    # last, with what is left: the 1.7B with both engines swapped against auto on GPU, i.e. the
    # rollout through megatron's layers instead of model/lean.py and the teacher's and student's
    # passes through model/lean.py's padding-free path instead of megatron's (TE) layers
    step throughput_qwen3_1p7b_swapped_engines 120 "$PY" tools/bench_throughput.py --model qwen3_1p7b --tp 1 \
      --batch 8 --prompt-len 256 --reference-len 512 --new-tokens 256 --steps 2 --warmup 1 --allow-oom \
      --label qwen3_1p7b_swapped_engines --inference-engine megatron --train-engine lean \
      --csv "$OUTDIR/throughput.csv" --json "$OUTDIR/throughput_qwen3_1p7b_swapped.json"
  fi

  # 8. summary (last)
  "$PY" - "$OUTDIR" "$STEPS" "$WORK/env.json" "$((SECONDS - START))" <<'PYEOF'
import csv, json, os, sys

out, steps_file, env_file, elapsed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
env = json.load(open(env_file)) if os.path.exists(env_file) and os.path.getsize(env_file) else {}
steps = [line.rstrip("\n").split("\t") for line in open(steps_file) if line.strip()]


def rows(name):
    path = os.path.join(out, name)
    return list(csv.DictReader(open(path))) if os.path.exists(path) else []


lines = ["# atesd-mc GPU check", "",
         f"device: {env.get('device', '?')} ({env.get('gpu_mem_gib', '?')} GiB) | python {env.get('python', '?')} | "
         f"torch {env.get('torch', '?')} | triton {env.get('triton', '?')} | megatron-core "
         f"{env.get('megatron_core', '?')} | {elapsed} s", "",
         "| step | status | seconds | note |", "|---|---|---|---|"]
lines += [f"| {s[0]} | {s[1]} | {s[2]} | {s[3] if len(s) > 3 else ''} |" for s in steps]
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
status = {s[0]: s[1] for s in steps}
ok = (all(s[1] in ("ok", "skipped") for s in steps)
      and not any(s[1] == "skipped" and s[3:] == ["time budget"] for s in steps)
      and all(status.get(k) == "ok" for k in ("environment", "kernel_tests", "bench_kernels")))
lines += ["", f"RESULT: {'PASS' if ok else 'FAIL'}"]
text = "\n".join(lines)
open(os.path.join(out, "summary.md"), "w").write(text + "\n")
json.dump({"env": env, "steps": steps, "bench_kernels": kern, "throughput": thr, "pass": ok, "seconds": elapsed},
          open(os.path.join(out, "summary.json"), "w"), indent=2)
print("\n" + text)
sys.exit(0 if ok else 1)
PYEOF
}

main 2>&1 | tee "$OUTDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
