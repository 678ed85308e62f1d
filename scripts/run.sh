#!/usr/bin/env bash
# The main job: the regex study on the embedded world (offline, CPU, minutes). Extra arguments go to
# `python -m recipes.regex` (a recipe file, key=value overrides, --shard i/n, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} WANDB_MODE=disabled
exec .venv/bin/python -m recipes.regex "$@"
