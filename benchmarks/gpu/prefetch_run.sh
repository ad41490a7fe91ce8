#!/usr/bin/env bash
# One device call (carry .whl; ~7 min): batch-1 decode with L2 prefetches before the PDL wait — bf16 GEMVs
# (EDGELM_GEMV_PREFETCH="own,partner") and int4 (benchmarks/gpu/int4_dispatch/*.json: AHEAD, PREFETCH) —
# against none; two recapture variants; the int4 profile; GPU tests of PDL equality and int4 kernels with them on.
source benchmarks/gpu/site_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 1024 --output-len 64 --repeat 3 --skip-peaks"
for pf in 0,0 1,0 0,1 1,1 0,0; do
  echo "== bf16 EDGELM_GEMV_PREFETCH=$pf"
  EDGELM_GEMV_PREFETCH=$pf timeout 60 $b --result-file $OUT/bs1_bf16_pf_${pf/,/_}.json 2>&1 | grep -v -i warn | tail -1
done
for v in same keep; do
  echo "== bf16 EDGELM_GRAPH_RECAPTURE=$v"; EDGELM_GRAPH_RECAPTURE=$v timeout 60 $b 2>&1 | grep -v -i warn | tail -1
done
q="$b --torchao-config int4wo-128"
echo "== int4 built-in"; timeout 90 $q --result-file $OUT/bs1_int4_builtin.json 2>&1 | grep -v -i warn | tail -1
for v in ahead ahead_pf pf; do
  echo "== int4 $v"; EDGELM_INT4_DISPATCH=benchmarks/gpu/int4_dispatch/$v.json timeout 90 $q --result-file $OUT/bs1_int4_$v.json 2>&1 | grep -v -i warn | tail -1
done
echo "== int4 decode profile (ahead_pf)"
EDGELM_INT4_DISPATCH=benchmarks/gpu/int4_dispatch/ahead_pf.json timeout 90 python3 benchmarks/gpu/decode_profile.py \
    --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --torchao-config int4wo-128 --batch-size 1 \
    --input-len 1024 --output-len 80 --skip-peaks --out $OUT/decode_profile_int4wo-128_ahead_pf.json 2>&1 | grep -v -i warn | head -1
echo "== GPU tests with the prefetches on"
EDGELM_GEMV_PREFETCH=1,1 EDGELM_INT4_DISPATCH=benchmarks/gpu/int4_dispatch/ahead_pf.json timeout 150 python3 -m pytest -q \
    -p no:cacheprovider -m gpu tests/test_cuda_graph.py tests/test_int4.py tests/test_fused_ops.py 2>&1 | tail -3
