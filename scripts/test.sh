#!/usr/bin/env bash
# The whole test suite: ruff, then pytest (CPU, offline). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
# The sandbox tests run with bubblewrap (setup.sh installs it) and fail, not skip, where it is missing.
export SIEVE_SANDBOX_TESTS=${SIEVE_SANDBOX_TESTS:-require}
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
