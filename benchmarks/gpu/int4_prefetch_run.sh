#!/usr/bin/env bash
# Not run yet (2026-12-06: no device could be started for the rest of the session). One device call (carry .whl): batch-1 int4wo-128 decode with the built-in dispatch and with gemv_h2's
# next tile loaded ahead (AHEAD) and/or L2 prefetches before the PDL wait (benchmarks/gpu/int4_dispatch/*.json),
# then the M = 1 sweep with those candidates and the decode with its dispatch, and a profile.
source benchmarks/gpu/site_setup.sh
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --torchao-config int4wo-128 --batch-size 1 --input-len 1024 --output-len 64 --repeat 3 --skip-peaks"
echo "== int4 built-in dispatch"; timeout 90 $b 2>&1 | grep -v -i warn | tail -1
for v in ahead ahead_pf pf; do
  echo "== int4 $v"; EDGELM_INT4_DISPATCH=benchmarks/gpu/int4_dispatch/$v.json timeout 90 $b 2>&1 | grep -v -i warn | tail -1
done
timeout 170 python3 benchmarks/gpu/int4_bench.py --tune --ms 1 --tune-budget 200 --tune-out $OUT/int4_tune_m1_h100.json \
    2>&1 | grep -v -i warn | grep -A14 "geometric"
echo "== int4 swept dispatch"; EDGELM_INT4_DISPATCH=$OUT/int4_tune_m1_h100.json timeout 90 $b 2>&1 | grep -v -i warn | tail -1
echo "== int4 decode profile (swept dispatch)"
EDGELM_INT4_DISPATCH=$OUT/int4_tune_m1_h100.json timeout 90 python3 benchmarks/gpu/decode_profile.py --model-path llama-3.1-8b \
    --load-format dummy --dtype bfloat16 --torchao-config int4wo-128 --batch-size 1 --input-len 1024 --output-len 80 \
    --skip-peaks --out $OUT/decode_profile_llama-3.1-8b_int4wo-128_bs1_h100.json 2>&1 | grep -v -i warn | head -1
