#!/usr/bin/env bash
# One device call (carry .whl; ~9 min): int4 batch-1 steps with triton_ops "int4_rope" (the rotary + KV write
# in qkv_proj's gemv_h2) and "fused_int4" (the whole layer fused) against the shipped step
# (int4_variants.py --fused-ab), bf16 batch 1 in the same call for the ratio, the int4wo-128 table with OP
# (default int4_rope) on, the GPU tests of the int4 kernels and of the fused paths, then (time left under
# BUDGET) the decode profile with OP on.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
m="--model-path llama-3.1-8b --load-format dummy --dtype bfloat16"
b="python3 -m edgelm.bench_one_batch $m"
ops=$(python3 -c "from edgelm.layers import triton_ops as t; print(','.join(sorted(t.DEFAULT_ON | {'${OP:-int4_rope}'})))")
timeout ${VT:-250} python3 benchmarks/gpu/int4_variants.py $m --torchao-config int4wo-128 --batch-size 1 --input-len 1024 \
    --output-len 64 --candidates none --fused-ab --out $OUT/int4_variants_bs1_fused_$dev.json 2>&1 | grep -v -i warn | tail -8
echo "($((SECONDS - t0)) s)"
timeout 80 $b --batch-size 1 --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_bs1_$dev.json 2>&1 | grep -v -i warn | tail -3
echo "($((SECONDS - t0)) s)"
EDGELM_TRITON_OPS=$ops timeout 110 $b --torchao-config int4wo-128 --batch-size ${TABLE_BS:-1 8 32} --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_int4wo-128_${OP:-int4_rope}_$dev.json 2>&1 | grep -v -i warn | tail -5
echo "($((SECONDS - t0)) s)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_int4.py tests/test_int4_fused.py \
    tests/test_cuda_graph.py::test_fused_int4_layers_match_unfused tests/test_cuda_graph.py::test_pdl_decode_matches_plain_launches \
    2>&1 | tee $OUT/gpu_tests_fused_int4.txt | tail -4
echo "($((SECONDS - t0)) s)"
left=$(( ${BUDGET:-570} - (SECONDS - t0) ))
(( left > 40 )) && EDGELM_TRITON_OPS=$ops timeout $left python3 benchmarks/gpu/decode_profile.py $m --torchao-config int4wo-128 \
    --batch-size 1 --input-len 1024 --output-len 80 --skip-peaks \
    --out $OUT/decode_profile_llama-3.1-8b_int4wo-128_${OP:-int4_rope}_bs1_$dev.json 2>&1 | grep -v -i warn | tail -3
echo "total $((SECONDS - t0)) s"
