#!/usr/bin/env bash
# One device call (carry .whl; ~1.5 min): the Llama-3.1-8B headline tables with the shipped dispatch — int4wo-128 batch
# 1 / 8 / 32, then bf16 batch 1 in the same call (the int4 JSON's bf16_same_call) — and cuda_w4's model / graph /
# reference GPU tests. Written for round 27 (down_proj's persistent cuda_w4); results/bench_one_batch_*_h100.json.
source benchmarks/gpu/site_setup.sh
m="--model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --input-len 1024 --output-len 64"
timeout 150 python3 -m edgelm.bench_one_batch $m --torchao-config int4wo-128 --batch-size 1 8 32 --result-file $OUT/bench_one_batch_llama-3.1-8b_int4wo-128_h100.json 2>&1 | grep -v -i warn | tail -4
timeout 100 python3 -m edgelm.bench_one_batch $m --batch-size 1 --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_bs1_h100.json 2>&1 | grep -v -i warn | tail -2
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_int4_cuda.py -k "model_decode or in_cuda_graph or matches_reference" 2>&1 | tee $OUT/gpu_tests_int4_cuda_shipped.txt | grep -v -i warn | tail -3
