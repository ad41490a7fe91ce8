#!/usr/bin/env bash
# One device call while iterating on the decode path: its GPU tests, then where a bs-1 decode step
# of the Llama-3.1-8B shape spends its time (benchmarks/gpu/decode_profile.py) with the default ops.
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu -x tests/test_cuda_graph.py tests/test_fused_ops.py \
    tests/test_triton_attention.py 2>&1 | tail -15
timeout 150 python3 benchmarks/gpu/decode_profile.py --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
    --batch-size 1 --input-len 1024 --output-len 80 --skip-peaks --out $OUT/decode_profile_bs1.json 2>&1 \
    | grep -v -i warn | grep -v "'op'" | head -40
