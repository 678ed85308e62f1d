#!/usr/bin/env bash
# Make (or refresh) the project's virtual environment in .venv with sieve and its dev tools.
# On a CPU-only machine torch is pinned to the CPU build by constraints/cpu.txt; on a GPU machine set
# SIEVE_TORCH_CONSTRAINTS= (empty) to let pip choose a CUDA build, and add the gpu extra if wanted.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=${SIEVE_TORCH_CONSTRAINTS-constraints/cpu.txt}
EXTRAS=${SIEVE_EXTRAS:-dev}
# Generated code runs only under bubblewrap (sieve refuses to run it without): install it where we can.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing bubblewrap (the sandbox for generated code)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q bubblewrap >&2 || { apt-get update -q >&2 && apt-get install -y -q bubblewrap >&2; } ||
      echo "could not install bubblewrap with apt-get; generated code will not run until it is installed" >&2
  else
    echo "bubblewrap (bwrap) is missing and cannot be installed from here: generated code will not run until" \
      "it is (sudo apt-get install bubblewrap / sudo dnf install bubblewrap / sudo pacman -S bubblewrap)" >&2
  fi
fi
# A real browser for the run report's tests (they skip without one): Debian's chromium and its driver,
# installed once where this runs as root with apt (CI's fresh machine); SIEVE_NO_BROWSER=1 skips it.
if [ -z "${SIEVE_NO_BROWSER:-}" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the report's browser tests..." >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; } \
    >/dev/null 2>&1 || echo "could not install chromium: the browser tests will skip" >&2
fi
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
