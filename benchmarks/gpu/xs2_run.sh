#!/usr/bin/env bash
# One device call (carry .whl; ~4 min): gemv_xs with two tiles loaded ahead against the M = 1 kernels
# (GPU tests, the M = 1 sweep and per-layer table), then int4wo-128 vs bf16 at batch 1 through the
# scheduler loop with the sweep's M = 1 dispatch.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_int4.py -k "gemv_xs or kernel_configs" 2>&1 | tail -2
timeout 170 python3 benchmarks/gpu/int4_bench.py --tune --ms 1 --tune-budget 140 \
    --tune-out $OUT/int4_tune_m1_$dev.json --out $OUT/int4_m1_$dev.json 2>&1 | grep -v -i warn | tail -16
export EDGELM_INT4_DISPATCH=$OUT/int4_tune_m1_$dev.json
timeout 150 python3 benchmarks/int4_speedup.py --model-path llama-3.1-8b --tokenizer-path .whl/smollm2-135m-config \
    --batch-sizes 1 --out $OUT/int4_speedup_m1_llama-3.1-8b_$dev.json 2>&1 | grep -v -i warn | tail -3
