#!/usr/bin/env bash
# One device call: the scheduler loop, overlap off / on, on the shipped Llama-3.1-8B config (128k vocabulary; a
# SmolLM2 tokenizer stands in: the loop only needs one to exist), bf16 and int4wo-128. Carry .whl.
set -u
OUT=${OUT:-/tmp/out}
source benchmarks/gpu/site_setup.sh
for q in none int4wo-128; do
  tq=""; name=bf16
  [ "$q" != none ] && { tq="--torchao-config $q"; name=$q; }
  timeout 240 python3 benchmarks/scheduler_loop.py --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
      --tokenizer-path .whl/smollm2-135m-config $tq --batch-sizes 1 8 32 --input-len 1024 --new-tokens 64 \
      --rounds 2 --out "$OUT/scheduler_loop_llama-3.1-8b_${name}_h100.json" 2>&1 | grep -E "^batch|Error" | head
done
