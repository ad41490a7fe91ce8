#!/usr/bin/env bash
# One device call (carry .whl; ~5 min): the hand-written CUDA batch-1 GEMV cuda_w4 (int4_cuda.py). Its GPU tests,
# then int4_variants.py round 13 on Llama-3.1-8B (cuda_w4 in place of each shape's gemv_h2, alone, then the
# winners together); where a combination won, the int4wo-128 batch-1 table with its tables (EDGELM_INT4_DISPATCH)
# and bf16 batch 1 in the same call, for the ratio.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_int4_cuda.py 2>&1 | tee $OUT/gpu_tests_int4_cuda.txt | tail -15
echo "($((SECONDS - t0)) s)"
m="--model-path llama-3.1-8b --load-format dummy --dtype bfloat16"
timeout ${VT:-220} python3 benchmarks/gpu/int4_variants.py $m --torchao-config int4wo-128 --batch-size 1 --input-len 1024 \
    --output-len 64 --candidates ${CANDS:-round13} --out $OUT/int4_variants_bs1_round13_$dev.json \
    --dispatch-out $OUT/int4_dispatch_round13_$dev.json 2>&1 | grep -v -i warn | tail -20
echo "($((SECONDS - t0)) s)"
if grep -q '"combo": "shipped"' $OUT/int4_dispatch_round13_$dev.json 2>/dev/null || [ ! -f $OUT/int4_dispatch_round13_$dev.json ]; then
    echo "no combination won"; exit 0
fi
EDGELM_INT4_DISPATCH=$OUT/int4_dispatch_round13_$dev.json timeout 100 python3 -m edgelm.bench_one_batch $m \
    --torchao-config int4wo-128 --batch-size ${BS:-1} --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_int4wo-128_cuda_w4_$dev.json 2>&1 | grep -v -i warn | tail -4
timeout 100 python3 -m edgelm.bench_one_batch $m --batch-size 1 --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_bs1_$dev.json 2>&1 | grep -v -i warn | tail -3
echo "total $((SECONDS - t0)) s"
