#!/usr/bin/env bash
# One device call (carry .whl; ~7 min): the x-stationary int4 GEMV (gemv_xs) on whatever GPU the device is
# (DEV=h100|h200 names the files): its GPU tests and the int4 graph tests, the int4 launch-config sweep
# (gemv_xs configs first at M = 1) and the per-layer table, then int4wo-128 vs bf16 through the scheduler
# loop in one run with the sweep's dispatch tables.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_int4.py tests/test_cuda_graph.py \
    -k "gemv_xs or kernel_configs" 2>&1 | tail -4
timeout 200 python3 benchmarks/gpu/int4_bench.py --tune --tune-budget ${TUNE_BUDGET:-90} \
    --tune-out $OUT/int4_tune_$dev.json --out $OUT/int4_$dev.json 2>&1 | grep -v -i warn | tail -30
export EDGELM_INT4_DISPATCH=$OUT/int4_tune_$dev.json
timeout 220 python3 benchmarks/int4_speedup.py --model-path llama-3.1-8b --tokenizer-path .whl/smollm2-135m-config \
    --batch-sizes 1 8 32 --out $OUT/int4_speedup_llama-3.1-8b_$dev.json 2>&1 | grep -v -i warn | tail -7
