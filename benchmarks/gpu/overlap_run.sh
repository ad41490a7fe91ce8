#!/usr/bin/env bash
# One device call: the scheduler loop with overlap scheduling off / on (Llama-3.1-8B shape and SmolLM2-135M
# shape, random weights; the 8B body with SmolLM2's vocabulary: the scheduler needs a tokenizer), then every
# GPU test (carry .whl, .fi and .gw; SKIP_TESTS=1 leaves the tests out).
# Usage on the device: bash benchmarks/gpu/overlap_run.sh   (results and logs under $OUT)
set -u
OUT=${OUT:-/tmp/out}
source benchmarks/gpu/site_setup.sh
timeout 200 python3 benchmarks/scheduler_loop.py --model-path ${WHL8B:-.gw}/llama-3.1-8b-body-smollm2-vocab \
    --load-format dummy --dtype bfloat16 \
    --batch-sizes 1 16 64 --input-len 1024 --new-tokens 64 --rounds 2 \
    --out "$OUT/scheduler_loop_llama-3.1-8b-body-smollm2-vocab_bf16_h100.json" 2>&1 | grep -E "^batch|Error|error" | head -20
timeout 120 python3 benchmarks/scheduler_loop.py --model-path .whl/smollm2-135m-config --load-format dummy \
    --dtype bfloat16 --batch-sizes 1 16 --input-len 256 --new-tokens 64 --rounds 2 \
    --out "$OUT/scheduler_loop_smollm2-135m_bf16_h100.json" 2>&1 | grep -E "^batch|Error|error" | head -20
[ "${SKIP_TESTS:-0}" = 1 ] && exit 0
timeout ${LIMIT:-240} python3 -m pytest -q -p no:cacheprovider -m gpu -rs $(grep -l "mark.gpu" tests/test_*.py) 2>&1 \
    | tee "$OUT/gpu_tests.txt" | tail -6
