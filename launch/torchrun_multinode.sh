#!/usr/bin/env bash
# Multi-node SED-SFT without a scheduler: run this on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/torchrun_multinode.sh --config run.yaml ...
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/torchrun_multinode.sh --config run.yaml ...
# Logs: logs/node<NODE_RANK>.log (and the terminal). SIGTERM to this script reaches torchrun,
# which forwards it to the workers: with --exit-signal-handler they save and stop.
# A worker that dies or hangs: every node's workers restart (MAX_RESTARTS, default 3; 0: off) and
# resume from the newest checkpoint in --save (launch/train.sh; NODE_RANK only names the log there:
# the c10d rendezvous at MASTER_ADDR:MASTER_PORT numbers the nodes).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
mkdir -p logs
export NNODES NODE_RANK MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500}
bash launch/train.sh --exit-signal-handler "$@" 2>&1 | tee "logs/node${NODE_RANK}.log"
