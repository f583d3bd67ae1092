#!/usr/bin/env bash
# The test suite on CPU (gloo), in two phases, each timed:
#   bash launch/run_tests.sh            # 1. unit and parallel tests  2. end-to-end runs (e2e)
#   bash launch/run_tests.sh --fast     # phase 1 only
#   bash launch/run_tests.sh [pytest args]   # e.g. tests/loss -k parity (phase 1 on those, then phase 2)
# Creates .venv with Python 3.12 and the project's locked dependencies on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCHDYNAMO_DISABLE=1
phases=(unit e2e)
if [ "${1:-}" = "--fast" ]; then phases=(unit); shift; fi
paths=(tests)
for arg in "$@"; do case "$arg" in tests*) paths=(); break ;; esac; done
status=0
for phase in "${phases[@]}"; do
  marker="not e2e"; [ "$phase" = "e2e" ] && marker="e2e"
  started=$(date +%s)
  set +e
  "$VENV_PY" -m pytest -q -p no:cacheprovider --durations=20 -m "$marker" "${paths[@]}" "$@"
  code=$?
  set -e
  echo "run_tests.sh: $phase phase: $(( $(date +%s) - started )) s (pytest exit $code)"
  if [ "$code" -eq 5 ] && [ "$phase" = "unit" ]; then
    echo "run_tests.sh: pytest collected no tests" >&2
    code=1
  fi
  [ "$code" -eq 5 ] && code=0  # a selection with no end-to-end test in it
  [ "$code" -ne 0 ] && status=$code
done
exit "$status"
