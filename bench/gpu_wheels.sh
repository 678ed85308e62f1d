#!/usr/bin/env bash
# Wheels for running sieve's benchmarks on an offline GPU machine that already has torch, numpy,
# tokenizers, safetensors, accelerate, pandas, pyarrow, scipy and huggingface_hub (a CUDA image):
#
#     bash bench/gpu_wheels.sh [PYTHON_VERSION]      # here, with a package index; default 3.12
#     # carry .whl/ there, then: bash bench/gpu.sh    # installs .whl/*.whl into a scratch folder
#
# These are the packages such an image lacked (checked on a torch 2.11 / transformers 5.17 / Python 3.12
# image: transformers is replaced by the version sieve is tested with). sae-lens and its import-time
# needs are here because the recipes load SAEs through it; polars (results tables) is not: the
# benchmarks write JSON. Dependencies are not resolved (--no-deps): the list is the resolution.
# The second list is for bench/bench_lmeval.py (STEPS=3 bash bench/gpu.sh): lm-eval and what it imports
# for the benchmark's local tasks, found by running that benchmark on a CPU in a Python holding only the
# image's packages above, transformers' own requirements and the first list (lm-eval's other
# requirements, for hub tasks, are not here). LMEVAL=0 leaves it out.
# PACK=1 then installs the wheels here into one tree for that Python and platform and replaces them by
# .whl/site.tar.xz (61 MB of wheels became 34.8 MB for Python 3.12), for a transfer that limits its size;
# bench/gpu.sh unpacks it in the wheels' place. Without PACK the wheels stay as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
pyver=${1:-3.12}
mkdir -p .whl
rm -f .whl/site.tar.xz  # an earlier pack would stand in for these wheels (bench/gpu.sh unpacks it first)
"$py" -m pip download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
    --platform manylinux1_x86_64 -d .whl \
    nnsight==0.8.1 greenlet==3.5.6 websocket-client==1.9.2 zstandard==0.25.0 \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    transformers==5.22.2 anyio==4.14.2 dill==0.4.1 tomli_w==1.2.0 \
    sae-lens==6.54.12 transformer-lens==3.9.0 better-abc==0.0.3 datasets==5.2.0 multiprocess==0.70.19 \
    docstring_parser==0.18.0 simple-parsing==0.1.9 opentelemetry-api==1.45.2 beartype==0.23.1 \
    fancy-einsum==0.0.3 typeguard==4.6.1 wandb==0.31.0 platformdirs==4.14.8
if [ "${LMEVAL:-1}" = 1 ]; then
"$py" -m pip download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl \
    lm-eval==0.4.13 sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 lxml==6.1.3 \
    xxhash==4.1.0 einops==0.8.2 jaxtyping==0.3.11 rich==15.0.0
fi
if [ "${PACK:-0}" = 1 ]; then
    rm -rf .whl/site .whl/site.tar.xz
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --only-binary=:all: \
        --python-version "$pyver" --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
        --platform manylinux1_x86_64 --target .whl/site .whl/*.whl
    tar -cJf .whl/site.tar.xz -C .whl/site .
    rm -rf .whl/site .whl/*.whl
fi
du -sh .whl
