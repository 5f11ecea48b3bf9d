#!/usr/bin/env bash
# Multi-node launch of tools/pretrain_atesd.py with torchrun's c10d rendezvous (H100 nodes).
#
# Run the same command on every node; the rendezvous assigns node ranks:
#   MASTER_ADDR=<node-0 host> NNODES=2 bash examples/launch_torchrun.sh examples/qwen3_8b.yaml [--flags]
# Single node:  bash examples/launch_torchrun.sh examples/qwen3_1p7b.yaml
# Slurm:        examples/launch_slurm.sbatch wraps this script (one task per node).
#
# Environment: MASTER_ADDR (rendezvous host, default 127.0.0.1), MASTER_PORT (29500), NNODES (1),
# GPUS_PER_NODE (default: the GPUs nvidia-smi lists, else 1), RDZV_ID (any id shared by all nodes),
# PYTHON (python3). Extra arguments are config flags and override the YAML (--micro-batch-size 2, ...).
#
# Layout (TP x PP x DP; DP = NNODES * GPUS_PER_NODE / (TP * PP)); the YAML headers hold the arithmetic:
#   model  | weights bf16 | LoRA r=64 state | activations / student token | layout, micro-batch
#   1.7B   |   3.2 GiB    |   1.2 GiB       |  ~5.9 MiB                 | TP1 PP1, mbs 4 (DP<=8), 2 (DP=16)
#   4B     |   7.5 GiB    |   2.2 GiB       |  ~14 MiB                  | TP1 PP1, mbs 2 (DP<=16)
#   8B     |  15.3 GiB    |   2.9 GiB       |  ~15 MiB                  | TP1 PP1, mbs 1 (DP<=32)
# (student sequences ~1.5k tokens, local attention spec; Transformer Engine's flash attention drops the
# score rows and roughly triples the micro-batch that fits.) The teacher is the same module with the
# adapters off, so no GPU holds a second copy; the KV cache of a GPU's rollouts is < 1 GiB. Every model
# fits one 80 GB H100, so TP and PP stay 1: a step is dominated by ~1024 sequential decode steps, which
# TP would slow with two all-reduces per layer and PP would serialise across stages. With the OPSD
# global batch of 32 prompts, DP x micro-batch must divide 32: 8 GPUs (1 node) or 16 (2 nodes) are the
# useful sizes; larger jobs should raise --global-batch-size.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${1:?usage: launch_torchrun.sh CONFIG.yaml [config flags]}"
shift
PY="${PYTHON:-python3}"
NNODES="${NNODES:-1}"
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [ "${GPUS_PER_NODE:-0}" -gt 0 ] || GPUS_PER_NODE=1
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-atesd-$(basename "$CONFIG" .yaml)}"
WORLD=$((NNODES * GPUS_PER_NODE))

# Megatron orders TP communication before compute on one CUDA stream; fail fast on a dead rank instead
# of hanging; variable sequence lengths fragment the caching allocator less with expandable segments.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
# Cluster-specific NCCL settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) come from the environment.

# Pre-flight on this node: the config parses and its layout fits the world size (seconds, no GPU).
cd "$REPO"
"$PY" - "$CONFIG" "$WORLD" "$@" <<'PYEOF'
import sys
sys.path.insert(0, ".")
from atesd_mc.config import ConfigError, parse_config
config, world, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
try:
    cfg = parse_config(["--config", config, *flags])
    dp = cfg.validate_world(world)
except ConfigError as e:
    sys.exit(f"launch_torchrun: {e}")
p, t = cfg.parallel, cfg.train
print(f"launch_torchrun: {cfg.name} | world {world} = TP {p.tensor_model_parallel_size} x PP "
      f"{p.pipeline_model_parallel_size} x DP {dp} | global batch {t.global_batch_size} = DP {dp} x micro-batch "
      f"{t.micro_batch_size} x {t.global_batch_size // (dp * t.micro_batch_size)} micro-batches", flush=True)
PYEOF

exec "$PY" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" --max-restarts=0 \
  tools/pretrain_atesd.py --config "$CONFIG" "$@"
