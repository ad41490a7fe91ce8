#!/usr/bin/env bash
# One device call: the issue-3/4 latency benchmarks (bf16 and int4wo-128, Llama-3.1-8B shape, random
# weights), a decode-step profile of bs 1, and the argmax GPU test. Results under $OUT.
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fused_ops.py -k argmax 2>&1 | tail -2
common="--model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --batch-size 1 8 32 64 --input-len 1024 --output-len 64"
timeout 240 python3 -m edgelm.bench_one_batch $common --compare-eager \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_h100.json 2>&1 | grep -v -i warn | tail -6
timeout 200 python3 -m edgelm.bench_one_batch $common --torchao-config int4wo-128 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_int4wo-128_h100.json 2>&1 | grep -v -i warn | tail -6
timeout 120 python3 benchmarks/gpu/decode_profile.py --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
    --batch-size 1 --input-len 1024 --output-len 80 --skip-peaks --out $OUT/decode_profile_llama-3.1-8b_bf16_bs1_h100.json \
    2>&1 | grep -v -i warn | grep -v "'op'" | head -3
