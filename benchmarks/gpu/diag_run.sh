#!/usr/bin/env bash
# One device call (carry .whl): the shipped batch-1 defaults against early release off, the old
# attention steps and PDL off, with graphs captured up to batch 1 and up to 64; bench_one_batch
# batch 1/8 with early release off.
source benchmarks/gpu/site_setup.sh
a="--model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 1024 --output-len 64"
for mbs in 1 64; do
  timeout 120 python3 benchmarks/gpu/decode_variants.py $a --cuda-graph-max-bs $mbs --quick \
      --out $OUT/decode_variants_quick_mbs${mbs}_h100.json 2>&1 | grep -v -i warn | tail -6
done
EDGELM_PDL_EARLY=0 timeout 100 python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy \
    --dtype bfloat16 --batch-size 1 8 --input-len 1024 --output-len 64 --skip-peaks 2>&1 | grep -v -i warn | tail -3
