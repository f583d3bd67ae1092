#!/usr/bin/env bash
# torchrun wrapper for sed_megatron.train, one call per node:
#   NPROC_PER_NODE=8 bash launch/train.sh --config examples/tiny_cpu.yaml [--flag value ...]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 bash launch/train.sh --config ...
# NPROC_PER_NODE defaults to the number of GPUs, or 2 processes on a CPU-only machine
# (gloo; the CPU runtime layer is applied by the trainer itself). PYTHON_BIN picks the
# interpreter (default: .venv/bin/python if present, else python3).
#
# Unattended runs: a worker that dies (or a rank that hangs: --hang-timeout-minutes) makes torchrun
# restart every node's workers, up to MAX_RESTARTS times (default 3; MAX_RESTARTS=0: no restart,
# the job ends with the first failure), and the restarted run resumes from the newest complete
# checkpoint in --save by itself (--no-resume: a fresh run into a used --save). The nodes meet in
# torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT, under RDZV_ID: the same on every node of
# one job and different between jobs (default: SLURM_JOB_ID, else sed-MASTER_ADDR-MASTER_PORT); the
# workers see it as TORCHELASTIC_RUN_ID, and number the attempts by the rendezvous's round.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON_BIN:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON_BIN=.venv/bin/python; else PYTHON_BIN=python3; fi
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
  if [ "${gpus:-0}" -gt 0 ]; then NPROC_PER_NODE=$gpus; else NPROC_PER_NODE=2; fi
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

distributed_args=(
  --nproc_per_node "$NPROC_PER_NODE"
  --nnodes "${NNODES:-1}"
  --rdzv-backend c10d
  --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
  --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-sed-$MASTER_ADDR-$MASTER_PORT}}"
  --max-restarts "${MAX_RESTARTS:-3}"
)
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export SED_MEGATRON_RDZV_ENDPOINT="$MASTER_ADDR:$MASTER_PORT"  # the workers number the attempts by its round

exec "$PYTHON_BIN" -m torch.distributed.run "${distributed_args[@]}" -m sed_megatron.train "$@"
