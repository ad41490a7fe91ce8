#!/usr/bin/env bash
# One device call (carry .whl): bench_one_batch batch 1/8 with the shipped defaults (with and without
# the peak measurement first), the old decode-attention steps, and early release off.
source benchmarks/gpu/site_setup.sh
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --batch-size 1 8 --input-len 1024 --output-len 64"
echo "== defaults, skip peaks"; timeout 60 $b --skip-peaks 2>&1 | grep -v -i warn | tail -2
echo "== defaults"; timeout 70 $b 2>&1 | grep -v -i warn | tail -2
echo "== old attention steps"; EDGELM_DECODE_CONFIG=block_n=64,min_split_len=64 timeout 60 $b --skip-peaks 2>&1 | grep -v -i warn | tail -2
echo "== old attention, no early release"; EDGELM_PDL_EARLY=0 EDGELM_DECODE_CONFIG=block_n=64,min_split_len=64 timeout 60 $b --skip-peaks 2>&1 | grep -v -i warn | tail -2
echo "== no pdl"; EDGELM_TRITON_OPS=rmsnorm,add_rmsnorm,silu_and_mul,rotary,gemv,argmax,rope_kv timeout 60 $b --skip-peaks 2>&1 | grep -v -i warn | tail -2
