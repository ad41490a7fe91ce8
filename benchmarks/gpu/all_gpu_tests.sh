#!/usr/bin/env bash
# One device call: every GPU test of the suite (carry .whl and .fi; .fi from flashinfer_prepare.sh).
# Usage on the device: bash benchmarks/gpu/all_gpu_tests.sh   (log under $OUT)
set -u
OUT=${OUT:-/tmp/out}
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .whl/*.whl .fi/wheels/*.whl > "$OUT/setup.log" 2>&1 || { tail -5 "$OUT/setup.log"; exit 1; }
tar -xJf .fi/flashinfer_site.tar.xz -C "$site" >> "$OUT/setup.log" 2>&1 || exit 1
export PYTHONPATH=$site:. PYTHONUNBUFFERED=1 FLASHINFER_WORKSPACE_BASE=/tmp/fiws FLASHINFER_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
set -o pipefail
timeout ${LIMIT:-400} python3 -m pytest -q -p no:cacheprovider -m gpu -rs ${FILES:-$(grep -l "mark.gpu" tests/test_*.py)} 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
