#!/usr/bin/env bash
# The test suite on CPU (gloo), in two phases, each timed:
#   bash launch/run_tests.sh            # 1. unit and parallel tests  2. end-to-end runs (e2e), side by side
#   bash launch/run_tests.sh --fast     # phase 1 only
#   bash launch/run_tests.sh [pytest args]   # e.g. tests/loss -k parity (phase 1 on those, then phase 2)
# The end-to-end phase runs beside the first (its output follows the first's): most tests run one
# process at a time, and the machine has two cores. Creates .venv with Python 3.12 and the
# project's locked dependencies on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCHDYNAMO_DISABLE=1
fast=0
if [ "${1:-}" = "--fast" ]; then fast=1; shift; fi
paths=(tests)
for arg in "$@"; do case "$arg" in tests*) paths=(); break ;; esac; done
started=$(date +%s)

run_phase() {  # NAME MARKER: pytest on the marker; prints its time, returns pytest's exit code (5: none collected)
  local name=$1 marker=$2 began code
  began=$(date +%s)
  set +e
  "$VENV_PY" -m pytest -q -p no:cacheprovider --durations=20 -m "$marker" "${paths[@]}" "${@:3}"
  code=$?
  set -e
  echo "run_tests.sh: $name phase: $(( $(date +%s) - began )) s (pytest exit $code)"
  return "$code"
}

e2e_log=""
if [ "$fast" = "0" ]; then
  e2e_log=$(mktemp)
  (run_phase e2e e2e "$@" > "$e2e_log" 2>&1; echo $? >> "$e2e_log.code") &
  e2e_pid=$!
fi
status=0
run_phase unit "not e2e" "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "run_tests.sh: pytest collected no tests" >&2
  status=1
fi
if [ -n "$e2e_log" ]; then
  wait "$e2e_pid" || true
  cat "$e2e_log"
  code=$(cat "$e2e_log.code" 2>/dev/null || echo 1)
  rm -f "$e2e_log" "$e2e_log.code"
  [ "$code" -eq 5 ] && code=0  # a selection with no end-to-end test in it
  [ "$code" -ne 0 ] && status=$code
fi
echo "run_tests.sh: both phases: $(( $(date +%s) - started )) s"
exit "$status"
