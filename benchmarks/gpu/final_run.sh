#!/usr/bin/env bash
# One device call: GPU tests, then the Llama-3.1-8B-shape latency benchmarks (bf16, int4wo-128).
# Usage on the device: bash benchmarks/gpu/final_run.sh   (writes under $OUT)
set -u
export PYTHONPATH=.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
timeout 110 python -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py tests/test_int4.py tests/test_grammar.py \
    -m gpu > "$OUT/gpu_tests.txt" 2>&1
tail -3 "$OUT/gpu_tests.txt"
timeout 190 python -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
    --batch-size 1 8 32 64 --input-len 1024 --output-len 64 --compare-eager \
    --result-file "$OUT/bench_one_batch_llama-3.1-8b_bf16_h100.json" > "$OUT/bf16.log" 2>&1
tail -3 "$OUT/bf16.log"
timeout 75 python -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
    --batch-size 1 --input-len 4096 --output-len 8 \
    --result-file "$OUT/bench_one_batch_llama-3.1-8b_bf16_prefill4k_h100.json" > "$OUT/prefill4k.log" 2>&1
tail -3 "$OUT/prefill4k.log"
timeout 165 python -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
    --torchao-config int4wo-128 --batch-size 1 8 32 --input-len 1024 --output-len 64 \
    --result-file "$OUT/bench_one_batch_llama-3.1-8b_int4wo-128_h100.json" > "$OUT/int4.log" 2>&1
tail -3 "$OUT/int4.log"
