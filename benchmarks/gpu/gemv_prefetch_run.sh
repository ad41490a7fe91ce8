#!/usr/bin/env bash
# One device call (carry .whl): batch-1 bf16 decode with the GEMVs' L2 prefetch before the PDL wait
# (EDGELM_GEMV_PREFETCH="own,partner" fractions of a row), against none, in one run.
source benchmarks/gpu/site_setup.sh
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 1024 --output-len 64 --repeat 3 --skip-peaks"
for pf in 0,0 1,0 0,1 1,1 0.5,0 0,0.5 0,0; do
  echo "== EDGELM_GEMV_PREFETCH=$pf"; EDGELM_GEMV_PREFETCH=$pf timeout 60 $b 2>&1 | grep -v -i warn | tail -1
done
