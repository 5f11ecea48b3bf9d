#!/usr/bin/env bash
# Prepares, on this machine (internet, the repo's CPU venv), what tools/gpu_check.sh needs on a GPU
# machine that has no package registry: the folder .gpu_bundle/ (git-ignored), carried along with
# the working tree (device tool: carry [".gpu_bundle"]; elsewhere: copy it next to the repo).
#
#   wheels/           cp312 manylinux wheels of what the GPU image (torch 2.11, Python 3.12, triton 3.6)
#                     lacks and training imports: megatron-core (the version requirements-cpu.txt pins,
#                     so the GPU runs the stack CI tests; MEGATRON_CORE_VERSION=X picks another),
#                     zarr + numcodecs + donfig + google-crc32c (problem stores, the synthetic task's
#                     too), math-verify + latex2sympy2_extended + antlr4-python3-runtime (answer
#                     checking in held-out evaluation). Dependencies are not resolved (--no-deps): the
#                     rest (numpy, sympy, pyyaml, packaging, typing-extensions) is on the image.
#   qwen3_tokenizer/  a Qwen-style byte-level BPE tokenizer (tools/make_tiny_qwen3.py, 2,048 ids)
#   gsm8k/ aime24/    problem stores made with it (tools/preprocess_data.py; GSM8K's first 200 rows,
#                     AIME24 held out): the data of gpu_check's Qwen3-1.7B-shaped LoRA run
#   ckpt_tiny_cpu/    a training checkpoint of gpu_check's tiny config made here on CPU (2 steps,
#                     bf16 weights, EMA teacher), which gpu_check resumes and fine-tunes on the GPU
#   MANIFEST.json     what was made, from which commit, with which versions, and the sizes
#
# Usage: bash tools/prepare_gpu_bundle.sh [--dest DIR] [--no-wheels] [--data-root DIR]
#   --dest DIR       default <repo>/.gpu_bundle
#   --no-wheels      skip the downloads (what gpu_check.sh --cpu-dry-run does when no bundle exists)
#   --data-root DIR  folder with gsm8k/train.jsonl and math_eval/aime24.jsonl (default $ATESD_SHARED_DATA,
#                    else <repo>/../shared/data)
# Wheels already in wheels/ are kept (a rerun downloads nothing new); wheels of other versions are
# removed (two versions of one package stop the install there). Everything else is rebuilt each
# time, so the checkpoint is always in the current code's format. Fails when the bundle exceeds
# 56 MiB (the device tool carries at most 64 MiB with the working tree).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$REPO/.gpu_bundle"
WHEELS=1
DATA_ROOT="${ATESD_SHARED_DATA:-$REPO/../shared/data}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST="$2"; shift ;;
    --no-wheels) WHEELS=0 ;;
    --data-root) DATA_ROOT="$2"; shift ;;
    -h|--help) sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "prepare_gpu_bundle: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
MAX_MIB=56

pinned() {  # the version requirements-cpu.txt pins for package $1
  sed -n "s/^$1==\([^ #]*\).*/\1/p" "$REPO/requirements-cpu.txt" | head -1
}
# name==version, one per line; megatron-core and zarr follow requirements-cpu.txt
wheel_specs() {
  cat <<EOF
megatron-core==${MEGATRON_CORE_VERSION:-$(pinned megatron-core)}
zarr==$(pinned zarr)
numcodecs==0.16.6
donfig==0.8.1.post1
google-crc32c==1.9.0
math-verify==0.9.0
latex2sympy2_extended==1.11.0
antlr4-python3-runtime==4.13.2
EOF
}

# "megatron-core==0.16.1" -> the prefix its wheel file starts with ("megatron_core-0.16.1-")
wheel_prefix() {
  local name=${1%%==*} version=${1##*==}
  echo "$(echo "$name" | tr '-' '_' | tr 'A-Z' 'a-z')-$version-"
}

fetch_wheels() {
  local dir="$DEST/wheels" spec keep=()
  mkdir -p "$dir"
  while read -r spec; do
    [ -n "${spec##*==}" ] || { echo "prepare_gpu_bundle: no version pinned for ${spec%%==*}" >&2; exit 1; }
    local prefix
    prefix=$(wheel_prefix "$spec")
    keep+=("$prefix")
    if compgen -G "$dir/$prefix*.whl" >/dev/null; then
      echo "  have $(basename "$(compgen -G "$dir/$prefix*.whl" | head -1)")"
      continue
    fi
    # the GPU image's Python: cp312, glibc manylinux (pip matches each platform tag exactly)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "$spec"
    echo "  got  $(basename "$(compgen -G "$dir/$prefix*.whl" | head -1)")"
  done < <(wheel_specs)
  local f p ok
  for f in "$dir"/*.whl; do  # other versions left from an earlier pin
    ok=0
    for p in "${keep[@]}"; do case "$(basename "$f")" in "$p"*) ok=1 ;; esac; done
    [ $ok = 1 ] || { echo "  removed $(basename "$f") (not pinned)"; rm -f "$f"; }
  done
}

make_problem_data() {
  local tmp
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/atesd_bundle.XXXXXX")"
  for f in "$DATA_ROOT/gsm8k/train.jsonl" "$DATA_ROOT/math_eval/aime24.jsonl"; do
    [ -f "$f" ] || { echo "prepare_gpu_bundle: $f missing (--data-root)" >&2; exit 1; }
  done
  head -200 "$DATA_ROOT/gsm8k/train.jsonl" > "$tmp/gsm8k.jsonl"
  "$PY" "$REPO/tools/make_tiny_qwen3.py" --out "$tmp/hf" --corpus "$tmp/gsm8k.jsonl" --rows 200 >/dev/null
  rm -rf "$DEST/qwen3_tokenizer" "$DEST/gsm8k" "$DEST/aime24"
  mkdir -p "$DEST/qwen3_tokenizer"
  # the tokenizer alone: the GPU run's model is the 1.7B shape with random weights, not this one
  cp "$tmp"/hf/tokenizer*.json "$DEST/qwen3_tokenizer/"
  "$PY" "$REPO/tools/preprocess_data.py" --input "$tmp/gsm8k.jsonl" --output "$DEST/gsm8k" \
    --tokenizer "$DEST/qwen3_tokenizer" --preset gsm8k --no-progress
  "$PY" "$REPO/tools/preprocess_data.py" --input "$DATA_ROOT/math_eval/aime24.jsonl" --output "$DEST/aime24" \
    --tokenizer "$DEST/qwen3_tokenizer" --preset aime --no-progress
  rm -rf "$tmp"
}

write_manifest() {
  "$PY" - "$DEST" "$REPO" <<'PYEOF'
import json, os, subprocess, sys
from importlib.metadata import version

dest, repo = sys.argv[1], sys.argv[2]


def git(*args):
    p = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None


def mib(path):
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return round(total / 2**20, 2)


wheels = sorted(os.listdir(os.path.join(dest, "wheels"))) if os.path.isdir(os.path.join(dest, "wheels")) else []
parts = {p: mib(os.path.join(dest, p)) for p in sorted(os.listdir(dest)) if os.path.isdir(os.path.join(dest, p))}
manifest = {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "made_with": {k: version(k) for k in ("torch", "megatron-core", "zarr")},
            "wheels": wheels, "mib": parts, "total_mib": round(sum(parts.values()), 2)}
with open(os.path.join(dest, "MANIFEST.json"), "w") as f:
    json.dump(manifest, f, indent=1)
print(json.dumps({"total_mib": manifest["total_mib"], **parts}))
PYEOF
}

mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
echo "prepare_gpu_bundle: $DEST"
if [ $WHEELS = 1 ]; then
  echo "wheels (cp312):"
  fetch_wheels
fi
echo "tokenizer and problem stores of the Qwen3-shaped run:"
make_problem_data
echo "tiny CPU checkpoint:"
bash "$REPO/tools/gpu_check.sh" --make-cpu-checkpoint "$DEST/ckpt_tiny_cpu"
sizes=$(write_manifest)
echo "sizes (MiB): $sizes"
total=$("$PY" -c "import json,sys; print(int(json.loads(sys.argv[1])['total_mib']))" "$sizes")
if [ "$total" -ge $MAX_MIB ]; then
  echo "prepare_gpu_bundle: $total MiB is over $MAX_MIB MiB (the device tool carries 64 MiB with the tree)" >&2
  exit 1
fi
echo "done: carry it with the working tree (device tool: carry [\".gpu_bundle\"]), then bash tools/gpu_check.sh"
