#!/usr/bin/env bash
# The README's GPU rows in one command, on a machine with a CUDA GPU (offline is fine):
#
#     bash bench/gpu.sh [OUT_DIR]          # default runs/gpu
#
# 1. bench/bench_steering.py --config gemma2-2b (gemma-2-2b's published config, random weights, bf16):
#    steered vs plain generate per gate/edit kind, and the sweep vs the study's loop, forked included.
# 2. bench/bench_steering.py --recipe-prompts: the default recipe's own rows (the embedded world's model
#    on the GPU): the study's loop, the sweep as it was, forking, the engine, both.
#
# Wheels in .whl/ (README: "Carrying sieve to an offline GPU machine") are installed into a scratch folder
# first. Each step has a time limit (STEP1_S, STEP2_S seconds) and prints each part as it ends, so a
# step stopped at its limit still leaves what it measured in OUT_DIR/*.log.
# Settings (environment): PYTHON (python3), CONFIG (gemma2-2b), DEVICE (cuda), REPEATS (4),
# RECIPE_PROMPTS (2), RECIPE_REPEATS (1), WHEELS (1: install .whl/*.whl when present).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
config=${CONFIG:-gemma2-2b}
device=${DEVICE:-cuda}
if [ "${WHEELS:-1}" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sieve-site \
        .whl/*.whl || { echo "bench/gpu.sh: installing the wheels in .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/sieve-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$py" -c "import platform, torch, transformers, nnsight; print('python', platform.python_version(), 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'nnsight', nnsight.__version__, 'cuda', \
torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    git rev-parse --short HEAD 2>/dev/null || true
} 2>&1 | tee "$out/env.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
rc=0
timeout "${STEP1_S:-330}" "$py" bench/bench_steering.py --config "$config" --device "$device" --repeats "${REPEATS:-4}" \
    --out "$out/$config.json" 2>&1 | tee "$out/$config.log" || rc=1
timeout "${STEP2_S:-150}" "$py" bench/bench_steering.py --recipe-prompts "${RECIPE_PROMPTS:-2}" \
    --repeats "${RECIPE_REPEATS:-1}" --cache "${RECIPE_CACHE:-/tmp/sieve-recipe-cache}" --out "$out/recipe.json" 2>&1 | tee "$out/recipe.log" \
    || rc=1
exit $rc
