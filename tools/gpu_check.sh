#!/usr/bin/env bash
# The first thing to run on a GPU machine: install what its image lacks, the GPU tests, one
# benchmark at a real shape. Everything is logged under $OUT; the last line says what passed.
#
#   OUT=DIR bash tools/gpu_check.sh                               # a GPU machine (wheels in $WHEELS, default .whl)
#   SED_MEGATRON_GPU_DRY_RUN=1 OUT=DIR bash tools/gpu_check.sh    # the same script on a CPU, the GPU faked
#
# Before, where pip reaches an index: `bash tools/gpu_setup.sh download .whl` (megatron-core, nltk
# and their small dependencies: what an image with torch, Triton and transformers lacks; a few MB).
# Steps, each with its own time limit inside an 8-minute budget (GPU_CHECK_BUDGET_S):
#   env      nvidia-smi, torch / Triton / Transformer Engine versions       -> $OUT/env.log
#   install  the wheels into /tmp/site (tools/gpu_setup.sh install)         -> $OUT/install.log
#   tests    pytest -m gpu, 240 s per test, Megatron's distributed timeout 2 minutes
#                                                                            -> $OUT/tests.log, $OUT/tests.xml
#   bench    tools/bench_fused_linear.py at 16384 and 32768 tokens x 3584 x a 76032-row shard, bf16:
#            Megatron's materialized path vs the fused loss's two schemes   -> $OUT/bench.md, bench.json, bench.log
# The dry run uses the project's environment (no install), runs the tests on the CPU layer
# (SED_MEGATRON_GPU_TESTS_ON_CPU=1) and benchmarks a small shape on the CPU. Exit 0 only when every
# step passed; Transformer Engine's tests are skipped where it is not installed, and the last line says so.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-${1:-gpu_check.out}}
WHEELS=${WHEELS:-.whl}
DRY=${SED_MEGATRON_GPU_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
start=$(date +%s)
passed=()
failed=()

remaining() { echo $(( BUDGET - ($(date +%s) - start) )); }

# step NAME LIMIT_S COMMAND...: runs COMMAND with the smaller of LIMIT_S and what is left of the
# budget, its output into $OUT/NAME.log; records the outcome.
step() {
  local name=$1 limit=$2
  shift 2
  local left
  left=$(remaining)
  if [ "$left" -lt 30 ]; then
    failed+=("$name (no time left)")
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "gpu_check: $name (at most ${limit} s)" >&2
  local began code
  began=$(date +%s)
  timeout --kill-after 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  code=$?
  echo "gpu_check: $name: exit $code after $(( $(date +%s) - began )) s" >&2
  if [ "$code" -eq 0 ]; then
    passed+=("$name")
  elif [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
    failed+=("$name (timed out after ${limit} s)")
  else
    failed+=("$name (exit $code)")
  fi
  return "$code"
}

if [ "$DRY" = "1" ]; then
  source launch/env.sh > "$OUT/install.log" 2>&1 || { echo "gpu_check: failed: install" ; exit 1; }
  PY=$REPO/$VENV_PY
  export SED_MEGATRON_GPU_TESTS_ON_CPU=1
  passed+=("install (dry run: the project's environment)")
  bench=(--shapes 256x64x2048 --dtypes bf16 --device cpu --repeats 1 --warmup 1)
else
  PY=${PYTHON:-python3}
  step install 120 env TARGET=/tmp/site PYTHON="$PY" bash tools/gpu_setup.sh install "$WHEELS"
  export PYTHONPATH="$REPO:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  bench=(--shapes 16384x3584x76032 32768x3584x76032 --dtypes bf16 --device cuda --repeats 3 --warmup 1)
fi
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1

ENV_REPORT='
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPUs", torch.cuda.device_count())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("triton", "transformers", "megatron.core", "transformer_engine", "apex"):
    try:
        module = __import__(name, fromlist=["__version__"])
        print(name, getattr(module, "__version__", "present"))
    except Exception as err:
        print(name, "absent:", type(err).__name__)
'
step env 60 bash -c 'date -u; nvidia-smi || echo "no nvidia-smi"; "$0" -c "$1"' "$PY" "$ENV_REPORT"

step tests 330 "$PY" -m pytest -m gpu tests -p no:cacheprovider -q -rs --timeout 240 --junitxml "$OUT/tests.xml"
tests_summary=$(grep -E " in [0-9.]+s" "$OUT/tests.log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')

step bench 240 "$PY" tools/bench_fused_linear.py "${bench[@]}" --json "$OUT/bench.json"
if [ -f "$OUT/bench.log" ]; then
  grep -E "^\|" "$OUT/bench.log" > "$OUT/bench.md" || true
fi

te=$(grep -E "^transformer_engine " "$OUT/env.log" 2>/dev/null | head -n 1)
summary="gpu_check: $([ "$DRY" = "1" ] && echo "dry run on the CPU, " )$(( $(date +%s) - start )) s; passed: ${passed[*]:-none}; failed: ${failed[*]:-none}; tests: ${tests_summary:-no summary}; ${te:-transformer_engine: unknown}"
echo "$summary" | tee "$OUT/summary.txt"
[ "${#failed[@]}" -eq 0 ]
