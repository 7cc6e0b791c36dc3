#!/usr/bin/env bash
# Issue 13's GPU check: CUDA tests, index + search on cuda vs cpu (same rankings, scores within 1e-3),
# bench ot (1x100, 64x100 at 49x49 and the 256x256 native grid, beside POT's batched solver on the GPU),
# bench index (images/s vs the bare forward; clip-retrieval's 1,500 img/s ViT-B/32 as a peer) and
# bench serve at concurrency 1/8/32, each printed as "GOAL <name>: expected ...; measured ...".
#
# Expected figures (written in scripts/gpu_check.py): bench ot 64x100x49x49 < 5 ms (H100);
# indexing/forward >= 0.9; serve p50 < 20 ms at concurrency 1 with top-100 reranked, throughput
# rising with concurrency; serve p50 / embedding p50 <= 1.15; cuda vs cpu identical rankings.
#
# How to run it on the device machine (see /work/.library/device/README.md; the device image has
# torch, timm, triton and Python 3.12 but no FAISS, POT, ...):
#   1. Here, once, in the repository root (the wheels travel with the tree, <= 64 MiB in all):
#        echo /.whl/ >> .git/info/exclude
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#          -d .whl faiss-cpu POT safetensors httpx httpcore h11 anyio sniffio fastapi starlette pydantic \
#          pydantic-core annotated-types typing-inspection uvicorn python-multipart pytest pluggy iniconfig
#      (pin the versions .venv uses: `.venv/bin/pip freeze`; one version of each; add what
#       `unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist` lists and the image lacks).
#   2. Copy the real weights and a few photos into the tree if ../shared is not carried:
#        mkdir -p shared && cp -r ../shared/weights ../shared/data shared/   (or carry them; <= 64 MiB)
#   3. One device call, carry [".whl"], timeout_s ~ 540 (the whole script is sized for ~8 minutes):
#        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#          --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
#        PYTHONUNBUFFERED=1 bash scripts/gpu-check.sh --out $OUT/gpu-check.json 2>&1 | tee $OUT/gpu-check.log
#
# On a CPU: `bash scripts/gpu-check.sh --device cpu --small` (what tests/test_gpu_check.py runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec "$PY" scripts/gpu_check.py "$@"
