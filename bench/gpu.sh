#!/usr/bin/env bash
# The README's GPU rows in one command, on a machine with a CUDA GPU (offline is fine):
#
#     bash bench/gpu.sh [OUT_DIR]          # default runs/gpu
#
# 1. bench/bench_steering.py --config gemma2-2b (gemma-2-2b's published config, random weights, bf16):
#    steered vs plain generate per gate/edit kind, and the sweep vs the study's loop, forked included.
# 2. bench/bench_steering.py --recipe-prompts: the default recipe's own rows (the embedded world's model
#    on the GPU): the study's loop, the sweep as it was, forking, the engine, both.
# 3. bench/bench_lmeval.py: the recipe's cells on three local harness tasks (the world's model on the GPU),
#    each cell in full against forked (run_harness_cells). Not in the default STEPS (the three steps'
#    limits add up to more than one 10-minute device call): STEPS=3 bash bench/gpu.sh runs it alone.
# 4. bench/bench_steering.py --sae-cost CONFIG: an SAE-space clamp (16k-latent JumpReLU SAE, sparse and full
#    encode) against plain generate on the GPU (STEPS="1 2 4"; not in the default STEPS either).
#
# Wheels in .whl/ (bench/gpu_wheels.sh; README: "Carrying sieve to an offline GPU machine") are installed
# into a fresh scratch folder first (or .whl/site.tar.xz, from PACK=1, unpacked there). Each step has a time
# limit (STEP1_S, STEP2_S seconds) and prints each part as it ends, so a step stopped at its limit still leaves
# what it measured in OUT_DIR/*.log.
# Settings (environment): PYTHON (python3), CONFIG (gemma2-2b), DEVICE (cuda), REPEATS (4),
# RECIPE_PROMPTS (2), RECIPE_REPEATS (1), RECIPE_CACHE (detector cache; /tmp/sieve-recipe-cache),
# STEP1_ARGS and STEP2_ARGS (more bench_steering.py arguments, e.g. STEP1_ARGS="--engines none grow"),
# STEPS (which steps, "1 2"), STEP3_S, LMEVAL_REPEATS (1), STEP4_S, SAE_REPEATS (3), WHEELS (1: install .whl/*.whl
# when present).
set -uo pipefail
out=$(mkdir -p "${1:-runs/gpu}" && cd "${1:-runs/gpu}" && pwd) || exit 1
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
config=${CONFIG:-gemma2-2b}
device=${DEVICE:-cuda}
if [ "${WHEELS:-1}" = 1 ] && [ -f .whl/site.tar.xz ]; then  # PACK=1 bash bench/gpu_wheels.sh
    rm -rf /tmp/sieve-site && mkdir -p /tmp/sieve-site && tar -xJf .whl/site.tar.xz -C /tmp/sieve-site \
        || { echo "bench/gpu.sh: unpacking .whl/site.tar.xz failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/sieve-site${PYTHONPATH:+:$PYTHONPATH}
elif [ "${WHEELS:-1}" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    rm -rf /tmp/sieve-site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/sieve-site .whl/*.whl \
        || { echo "bench/gpu.sh: installing the wheels in .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/sieve-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$py" -c "import platform, torch, transformers, nnsight; print('python', platform.python_version(), 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'nnsight', nnsight.__version__, 'cuda', \
torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" || exit 1
    echo "commit $(git describe --always --dirty 2>/dev/null || echo unknown)"
} 2>&1 | tee "$out/env.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "bench/gpu.sh: torch, transformers or nnsight do not import" >&2; exit 1; }
rc=0
steps=" ${STEPS:-1 2} "
if [[ $steps == *" 1 "* ]]; then
# shellcheck disable=SC2086  # STEP*_ARGS are word lists
timeout "${STEP1_S:-330}" "$py" bench/bench_steering.py --config "$config" --device "$device" --repeats "${REPEATS:-4}" \
    ${STEP1_ARGS:-} --out "$out/$config.json" 2>&1 | tee "$out/$config.log" || rc=1
fi
if [[ $steps == *" 2 "* ]]; then
# shellcheck disable=SC2086
timeout "${STEP2_S:-150}" "$py" bench/bench_steering.py --recipe-prompts "${RECIPE_PROMPTS:-2}" \
    --repeats "${RECIPE_REPEATS:-1}" --cache "${RECIPE_CACHE:-/tmp/sieve-recipe-cache}" ${STEP2_ARGS:-} \
    --out "$out/recipe.json" 2>&1 | tee "$out/recipe.log" || rc=1
fi
if [[ $steps == *" 3 "* ]]; then
timeout "${STEP3_S:-300}" "$py" bench/bench_lmeval.py --repeats "${LMEVAL_REPEATS:-1}" \
    --cache "${RECIPE_CACHE:-/tmp/sieve-recipe-cache}" --out "$out/lmeval.json" 2>&1 | tee "$out/lmeval.log" || rc=1
fi
if [[ $steps == *" 4 "* ]]; then
timeout "${STEP4_S:-120}" "$py" bench/bench_steering.py --sae-cost "$config" --device "$device" \
    --repeats "${SAE_REPEATS:-3}" --out "$out/sae-$config.json" 2>&1 | tee "$out/sae-$config.log" || rc=1
fi
exit $rc
