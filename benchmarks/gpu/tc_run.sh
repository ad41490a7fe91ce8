#!/usr/bin/env bash
# One device call (carry .whl): the int4 tensor-core kernel's GPU tests, a sweep of its launch configs
# against the other int4 kernels (int4_bench.py --tune), then fusion_check.sh. Results under $OUT.
source benchmarks/gpu/site_setup.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -x tests/test_int4.py -k "tc_kernel" 2>&1 | tail -4
timeout ${TUNE_LIMIT:-260} python3 benchmarks/gpu/int4_bench.py --tune --tune-budget ${TUNE_BUDGET:-170} \
    --tune-out $OUT/int4_tune_h200.json --out $OUT/int4_h200.json 2>&1 | grep -v -i warn | tail -50
[ "${FUSION:-1}" = 1 ] && bash benchmarks/gpu/fusion_check.sh
