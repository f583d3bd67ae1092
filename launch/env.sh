# Sourced by the launch scripts: find Python 3.12 and make the project's virtual environment.
#   source launch/env.sh   ->   $VENV_PY is .venv/bin/python with sed_megatron installed
# PYTHON=/path/to/python3.12 overrides the search; VENV=DIR moves the environment;
# SED_MEGATRON_UNPINNED=1 skips the lock (requirements/lock.txt).

_find_python312() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for candidate in python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$candidate"; return
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local version
    version=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | tail -n 1)
    if [ -n "$version" ]; then PYENV_VERSION="$version" pyenv which python; return; fi
  fi
  echo "launch/env.sh: Python 3.12 not found (set PYTHON=/path/to/python3.12)" >&2
  return 1
}

VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  _py=$(_find_python312) || exit 1
  "$_py" -m venv "$VENV" || exit 1
fi
VENV_PY="$VENV/bin/python"
# Installs only what is missing; the editable install keeps the checkout importable. The lock
# pins every package to the versions that produced the documented figures;
# SED_MEGATRON_UNPINNED=1 installs the newest versions setup.py allows instead.
_constraints=(-c requirements/lock.txt)
if [ "${SED_MEGATRON_UNPINNED:-0}" = "1" ]; then _constraints=(); fi
"$VENV_PY" -m pip install -q --disable-pip-version-check "${_constraints[@]}" -e ".[test]" || exit 1
export VENV_PY
