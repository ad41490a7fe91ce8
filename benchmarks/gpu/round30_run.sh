#!/usr/bin/env bash
# One device call (carry .whl; ~9.5 min): int4_variants.py round 30 (o_proj and qkv_proj on cuda_w4's one-tile
# form, each warp's whole weight slice loaded before the PDL wait, all programs in one wave) on Llama-3.1-8B, the
# tables and bf16 batch 1 in the same call where a combination won (round17_run.sh); then the shipped step with every
# int4 GEMV ablated (--ablate-gemv: what the rest of the step takes) and the shipped int4wo-128 step profiled kernel
# by kernel (decode_profile.py: what each kernel adds to the step after the one before it ends, in one decoder
# layer), as far as the call's time allows.
set -u
OUT=${OUT:-/tmp/out}
t0=$SECONDS
TESTS=0 CANDS=round30 ROUND=round30 BUDGET=0 VT=${VT:-360} bash benchmarks/gpu/round17_run.sh
source benchmarks/gpu/site_setup.sh
dev=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)
left=$(( ${TOTAL:-570} - (SECONDS - t0) ))
# the shipped step with every int4 GEMV launching nothing: what the rest of the step takes now (0.755 ms in round 4)
(( left > 180 )) && timeout 100 python3 benchmarks/gpu/int4_variants.py --model-path llama-3.1-8b --load-format dummy \
    --dtype bfloat16 --torchao-config int4wo-128 --batch-size 1 --input-len 1024 --output-len 64 --candidates none \
    --ablate-gemv --out $OUT/int4_ablate_gemv_$dev.json 2>&1 | grep -v -i warn | tail -6
left=$(( ${TOTAL:-570} - (SECONDS - t0) ))
(( left > 60 )) && timeout $left python3 benchmarks/gpu/decode_profile.py --model-path llama-3.1-8b --load-format dummy \
    --dtype bfloat16 --torchao-config int4wo-128 --batch-size 1 --input-len 1024 --output-len 80 --skip-peaks \
    --out $OUT/decode_profile_llama-3.1-8b_int4wo-128_bs1_$dev.json 2>&1 | grep -v -i warn | tail -14
echo "total $((SECONDS - t0)) s"
