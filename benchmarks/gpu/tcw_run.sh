#!/usr/bin/env bash
# One device call (carry .whl): GPU tests of the int4 tensor-core kernels, the int4 launch-config sweep
# (its dispatch table then applies through EDGELM_INT4_DISPATCH), then int4wo-128 vs bf16 through the
# scheduler loop in one run. Results under $OUT.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-h200}
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_int4.py -k "tc_kernel or cuda_graph or int4_linear" \
    2>&1 | tail -4
timeout 170 python3 benchmarks/gpu/int4_bench.py --tune --tune-budget ${TUNE_BUDGET:-100} \
    --tune-out $OUT/int4_tune_$dev.json --out $OUT/int4_$dev.json 2>&1 | grep -v -i warn | tail -40
export EDGELM_INT4_DISPATCH=$OUT/int4_tune_$dev.json
timeout 220 python3 benchmarks/int4_speedup.py --model-path llama-3.1-8b --tokenizer-path .whl/smollm2-135m-config \
    --batch-sizes 1 8 32 --out $OUT/int4_speedup_llama-3.1-8b_$dev.json 2>&1 | grep -v -i warn | tail -8
