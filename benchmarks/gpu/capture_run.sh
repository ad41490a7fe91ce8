#!/usr/bin/env bash
# One device call (carry .whl): batch-1 decode after the first graph capture, with the allocator
# cleaned before it, and with the graphs captured twice (a recapture measured 5.61 ms vs 5.67).
source benchmarks/gpu/site_setup.sh
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 1024 --output-len 64 --repeat 3 --skip-peaks"
for env in X=0 EDGELM_GRAPH_PRECLEAN=1 EDGELM_GRAPH_RECAPTURE=1 X=0; do
  echo "== $env"; env $env timeout 60 $b 2>&1 | grep -v -i warn | tail -1
done
