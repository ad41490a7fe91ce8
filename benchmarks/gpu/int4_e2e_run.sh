#!/usr/bin/env bash
# One device call (carry .whl): int4wo-128 vs bf16 through the scheduler loop with the shipped dispatch
# tables (DISPATCH + SHAPE_DISPATCH), no tuning file. Results under $OUT.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-h200}
timeout ${LIMIT:-170} python3 benchmarks/int4_speedup.py --model-path llama-3.1-8b \
    --tokenizer-path .whl/smollm2-135m-config --batch-sizes ${BS:-1 8 32} --rounds ${ROUNDS:-1} \
    --out $OUT/int4_speedup_llama-3.1-8b_$dev.json 2>&1 | grep -v -i warn | tail -8
