#!/usr/bin/env bash
# The test suite on CPU (gloo): bash launch/run_tests.sh [pytest args]
# Creates .venv with Python 3.12 and the project's dependencies on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCHDYNAMO_DISABLE=1
status=0
"$VENV_PY" -m pytest -q -p no:cacheprovider tests "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "run_tests.sh: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
