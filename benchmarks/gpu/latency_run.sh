#!/usr/bin/env bash
# One device call (carry .whl; ~7 min): the README's Llama-3.1-8B-shape latency table (bench_one_batch:
# bf16 at batch 1/8/32/64 against the bandwidth measured in the same run, 4k prefill, int4wo-128 at
# batch 1/8/32 with the built-in int4 dispatch tables). DEV=h100|h200 names the files.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16"
timeout 200 $b --batch-size 1 8 32 64 --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_$dev.json 2>&1 | grep -v -i warn | tail -6
timeout 80 $b --batch-size 1 --input-len 4096 --output-len 8 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_prefill4k_$dev.json 2>&1 | grep -v -i warn | tail -3
timeout 170 $b --torchao-config int4wo-128 --batch-size 1 8 32 --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_int4wo-128_$dev.json 2>&1 | grep -v -i warn | tail -5
