#!/usr/bin/env bash
# One device call (carry .whl; BUDGET=290 s by default, 500 for all of it): the README's Llama-3.1-8B-shape latency figures with the batch-1
# graph captured twice (the default since 2026-12-06) — bf16 at batch 1/8/32/64, the CUDA-graph GPU tests,
# then int4wo-128 at batch 1/8/32, the 4k prefill and an int4wo-128 batch-1 decode profile as far as time
# allows (BUDGET seconds).
# DEV=h100|h200 names the files.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS; budget=${BUDGET:-290}
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16"
timeout 160 $b --batch-size 1 8 32 64 --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_$dev.json 2>&1 | grep -v -i warn | tail -6
echo "($((SECONDS - t0)) s)"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_cuda_graph.py 2>&1 | tee $OUT/gpu_tests.txt | tail -3
echo "($((SECONDS - t0)) s)"
left=$(( budget - (SECONDS - t0) ))
(( left > 30 )) && timeout $left $b --torchao-config int4wo-128 --batch-size 1 8 32 --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_int4wo-128_$dev.json 2>&1 | grep -v -i warn | tail -5
echo "($((SECONDS - t0)) s)"
left=$(( budget - (SECONDS - t0) ))
(( left > 40 )) && timeout $left $b --batch-size 1 --input-len 4096 --output-len 8 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_prefill4k_$dev.json 2>&1 | grep -v -i warn | tail -3
left=$(( budget - (SECONDS - t0) ))
(( left > 60 )) && timeout $left python3 benchmarks/gpu/decode_profile.py --model-path llama-3.1-8b --load-format dummy \
    --dtype bfloat16 --torchao-config int4wo-128 --batch-size 1 --input-len 1024 --output-len 80 --skip-peaks \
    --out $OUT/decode_profile_llama-3.1-8b_int4wo-128_bs1_$dev.json 2>&1 | grep -v -i warn | head -3
echo "total $((SECONDS - t0)) s"
