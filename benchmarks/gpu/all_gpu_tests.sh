#!/usr/bin/env bash
# One device call: every GPU test of the suite (carry .whl and .fi; .fi from flashinfer_prepare.sh).
# Usage on the device: bash benchmarks/gpu/all_gpu_tests.sh   (log under $OUT)
set -u
OUT=${OUT:-/tmp/out}
source benchmarks/gpu/site_setup.sh
set -o pipefail
timeout ${LIMIT:-400} python3 -m pytest -q -p no:cacheprovider -m gpu -rs ${FILES:-$(grep -l "mark.gpu" tests/test_*.py)} 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
