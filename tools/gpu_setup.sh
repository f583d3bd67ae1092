#!/usr/bin/env bash
# Install sed_megatron on a GPU machine that has Python 3.12 and a CUDA torch but no internet,
# from wheels carried along.
#
#   # here, where pip reaches a package index: the wheels into DIR (default .whl)
#   bash tools/gpu_setup.sh download [DIR]
#   # there, on the GPU machine: install them into TARGET (default /tmp/site), then run with it
#   bash tools/gpu_setup.sh install [DIR]  &&  export PYTHONPATH=/tmp/site:$PYTHONPATH
#   python3 -m pytest -m gpu tests
#
# The GPU machine's torch, transformers, safetensors, numpy, pyyaml, tqdm and tensorboard are
# used as they are; only what it lacks travels: megatron-core (the version of the lock), nltk
# and their small dependencies, and sed_megatron itself. Versions come from requirements/lock.txt
# when it names them. Extra wheels (Liger-Kernel for the benchmarks, say) may be added to DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:-}
dir=${2:-.whl}
target=${TARGET:-/tmp/site}
PY=${PYTHON:-python3}

pinned() {  # NAME -> NAME==VERSION from the lock, else NAME
  local version
  version=$(grep -i -E "^$1==" requirements/lock.txt 2>/dev/null | head -n 1 | cut -d= -f3)
  if [ -n "$version" ]; then echo "$1==$version"; else echo "$1"; fi
}

case "$action" in
  download)
    mkdir -p "$dir"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
      platforms+=(--platform "$p")
    done
    packages=("$(pinned megatron-core)" "$(pinned nltk)" "$(pinned defusedxml)" "$(pinned click)" "$(pinned joblib)"
              "$(pinned regex)")
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
      -d "$dir" "${packages[@]}"
    "$PY" -m pip wheel --no-deps --no-build-isolation -q -w "$dir" .
    echo "gpu_setup.sh: wheels in $dir: $(ls "$dir" | tr '\n' ' ')"
    ;;
  install)
    ls "$dir"/*.whl >/dev/null 2>&1 || { echo "gpu_setup.sh: error: no wheels in $dir (run 'download' first)" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$dir"/*.whl
    PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'EOF'
import torch, megatron.core, sed_megatron
from sed_megatron.runtime import check_version, select_device, transformer_engine_available
print(f"gpu_setup.sh: torch {torch.__version__} (CUDA {torch.version.cuda}), megatron-core {check_version()}, "
      f"device {select_device()}, Transformer Engine {'yes' if transformer_engine_available() else 'no'}")
EOF
    echo "gpu_setup.sh: installed into $target; export PYTHONPATH=$target:\$PYTHONPATH"
    ;;
  *)
    echo "usage: bash tools/gpu_setup.sh download [DIR] | install [DIR]   (TARGET=/tmp/site)" >&2
    exit 2
    ;;
esac
