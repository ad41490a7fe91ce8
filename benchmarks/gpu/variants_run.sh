#!/usr/bin/env bash
# One device call (carry .whl; ~9 min): batch-1 decode variants on one loaded Llama-3.1-8B-shape model
# (decode_variants.py: GEMV configs per shape, attention split configs, attn_merge, PDL off), then
# every GPU test (PDL on, the default). DEV=h100|h200 names the files.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"
timeout 300 python3 benchmarks/gpu/decode_variants.py --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
    --batch-size 1 --input-len 1024 --output-len 64 --out $OUT/decode_variants_bs1_$dev.json 2>&1 | grep -v -i warn | tail -40
[ -n "${TESTS:-}" ] && timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu $(grep -l "mark.gpu" tests/test_*.py) 2>&1 | tail -6
