#!/usr/bin/env bash
# The CPU quickstart, end to end (about 5 minutes on 2 cores, after the install):
#   bash launch/quickstart_cpu.sh
# Makes .venv with Python 3.12 and the project on first use, then generates a task, trains a
# tokenizer and a small Llama, fine-tunes it with CE and with SED-SFT at TP=2, and prints
# diversity and accuracy. Output: runs/quickstart (replaced on every run).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rm -rf runs/quickstart
exec "$VENV_PY" examples/quickstart/quickstart.py --workdir runs/quickstart "$@"
