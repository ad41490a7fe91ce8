#!/usr/bin/env bash
# One device call (carry .whl; ~7 min): --quantize-lm-head int8. Its GPU tests, the head alone against the 16-bit
# head (int8_head_bench.py, every candidate config), then Llama-3.1-8B batch-1 decode in one call: int4wo-128 with
# the int8 head (batch 1, 8, 32; with the best configs the sweep found), bf16, and int4wo-128 with its bf16 head.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_int8_head.py 2>&1 | tee $OUT/gpu_tests_int8_head.txt | tail -6
echo "($((SECONDS - t0)) s)"
timeout 120 python3 benchmarks/gpu/int8_head_bench.py --out $OUT/int8_head_bench_$dev.json --best-env $OUT/best_env 2>&1 \
    | grep -v -i warn | tail -8
[ -s $OUT/best_env ] && export EDGELM_INT8_HEAD_CONFIG=$(cat $OUT/best_env)
echo "EDGELM_INT8_HEAD_CONFIG=$EDGELM_INT8_HEAD_CONFIG ($((SECONDS - t0)) s)"
m="--model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --input-len 1024 --output-len 64"
timeout 130 python3 -m edgelm.bench_one_batch $m --torchao-config int4wo-128 --quantize-lm-head int8 --batch-size ${BS:-1 8 32} \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_int4wo-128_int8head_$dev.json 2>&1 | grep -v -i warn | tail -5
echo "($((SECONDS - t0)) s)"
timeout 100 python3 -m edgelm.bench_one_batch $m --batch-size 1 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_bs1_$dev.json 2>&1 | grep -v -i warn | tail -3
echo "($((SECONDS - t0)) s)"
timeout 100 python3 -m edgelm.bench_one_batch $m --torchao-config int4wo-128 --batch-size 1 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_int4wo-128_bs1_$dev.json 2>&1 | grep -v -i warn | tail -3
echo "total $((SECONDS - t0)) s"
