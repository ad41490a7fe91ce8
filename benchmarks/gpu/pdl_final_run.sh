#!/usr/bin/env bash
# One device call (carry .whl; ~5 min): the README's latency tables with the shipped defaults
# (latency_run.sh: bf16 batch 1/8/32/64, 4k prefill, int4wo-128), the batch-1 kernel profile, then
# every GPU test.
bash benchmarks/gpu/latency_run.sh
source benchmarks/gpu/site_setup.sh
timeout 60 python3 benchmarks/gpu/decode_profile.py --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
    --batch-size 1 --input-len 1024 --output-len 80 --skip-peaks \
    --out $OUT/decode_profile_llama-3.1-8b_bf16_bs1_h100.json 2>&1 | grep -v -i warn | tail -1
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu $(grep -l "mark.gpu" tests/test_*.py) 2>&1 | tail -4
