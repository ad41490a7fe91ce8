#!/usr/bin/env bash
# Run on 2026-12-06 (H100; results in benchmarks/results/ablations/recapture/). One device call (carry .whl; ~3 min): where the
# batch-1 graph of a second capture gains ~1.3 % over the first (EDGELM_GRAPH_RECAPTURE=1, 5.53 vs
# 5.61 ms on an H100): kernel profiles of both, with PDL's early release on and off, and with PDL off.
# Since then the second capture of the batch-1 graph is the default: "first" runs with EDGELM_GRAPH_RECAPTURE=0
# (and without PDL nothing is captured twice, so second_nopdl now repeats first_nopdl).
source benchmarks/gpu/site_setup.sh
p="python3 benchmarks/gpu/decode_profile.py --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 1024 --output-len 80 --skip-peaks"
NOPDL=rmsnorm,add_rmsnorm,silu_and_mul,rotary,gemv,argmax,rope_kv
for tag in "first:EDGELM_GRAPH_RECAPTURE=0" "second:X=0" "first_noearly:EDGELM_GRAPH_RECAPTURE=0;EDGELM_PDL_EARLY=0" \
           "second_noearly:EDGELM_PDL_EARLY=0" "first_nopdl:EDGELM_GRAPH_RECAPTURE=0;EDGELM_TRITON_OPS=$NOPDL" \
           "second_nopdl:EDGELM_TRITON_OPS=$NOPDL"; do
  name=${tag%%:*}; envs=${tag#*:}
  echo "== $name ($envs)"
  env ${envs//;/ } timeout 60 $p --out $OUT/decode_profile_recapture_${name}_h100.json 2>&1 | grep -v -i warn | tail -1
done
echo "== int4wo-128 first capture"
timeout 90 $p --torchao-config int4wo-128 --out $OUT/decode_profile_int4wo-128_h100.json 2>&1 | grep -v -i warn | tail -1
