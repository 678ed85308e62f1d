#!/usr/bin/env bash
# Make (or refresh) the project's virtual environment in .venv with sieve and its dev tools.
# On a CPU-only machine torch is pinned to the CPU build by constraints/cpu.txt; on a GPU machine set
# SIEVE_TORCH_CONSTRAINTS= (empty) to let pip choose a CUDA build, and add the gpu extra if wanted.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=${SIEVE_TORCH_CONSTRAINTS-constraints/cpu.txt}
EXTRAS=${SIEVE_EXTRAS:-dev}
stamp_src="$(cat pyproject.toml ${CONSTRAINTS:+$CONSTRAINTS}) $EXTRAS"
stamp=$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)
if [ -x .venv/bin/python ] && [ "$(cat .venv/.sieve-stamp 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
echo "setting up .venv (about 2 minutes the first time)..." >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >&2
args=(-q -e ".[$EXTRAS]")
[ -n "$CONSTRAINTS" ] && args+=(-c "$CONSTRAINTS")
.venv/bin/python -m pip install "${args[@]}" >&2
echo "$stamp" > .venv/.sieve-stamp
