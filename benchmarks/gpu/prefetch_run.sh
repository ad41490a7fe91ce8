#!/usr/bin/env bash
# Not run yet (2026-12-06: no device could be started for the rest of the session). One device call (carry .whl; ~3.5 min): batch-1 decode with L2 prefetches before the PDL wait — bf16 GEMVs
# (EDGELM_GEMV_PREFETCH="own,partner") and int4 (benchmarks/gpu/int4_dispatch/ahead_pf.json: AHEAD, PREFETCH) —
# against none, in one run; then the PDL-equality and int4 GPU tests with them on.
source benchmarks/gpu/site_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 1024 --output-len 64 --repeat 3 --skip-peaks"
for pf in 0,0 1,1 1,0; do
  echo "== bf16 EDGELM_GEMV_PREFETCH=$pf"
  EDGELM_GEMV_PREFETCH=$pf timeout 50 $b --result-file $OUT/bs1_bf16_pf_${pf/,/_}.json 2>&1 | grep -v -i warn | tail -1
done
q="$b --torchao-config int4wo-128"
echo "== int4 built-in"; timeout 60 $q --result-file $OUT/bs1_int4_builtin.json 2>&1 | grep -v -i warn | tail -1
echo "== int4 ahead_pf"; EDGELM_INT4_DISPATCH=benchmarks/gpu/int4_dispatch/ahead_pf.json timeout 60 $q --result-file $OUT/bs1_int4_ahead_pf.json 2>&1 | grep -v -i warn | tail -1
echo "== GPU tests with the prefetches on"
EDGELM_GEMV_PREFETCH=1,1 EDGELM_INT4_DISPATCH=benchmarks/gpu/int4_dispatch/ahead_pf.json timeout 70 python3 -m pytest -q \
    -p no:cacheprovider -m gpu tests/test_cuda_graph.py::test_pdl_decode_matches_plain_launches tests/test_int4.py 2>&1 | tail -3
