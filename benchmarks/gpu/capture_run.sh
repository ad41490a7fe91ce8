#!/usr/bin/env bash
# One device call (carry .whl; ~4 min): batch-1 decode with every size warmed up before any capture
# (the default), with each size captured right after its own warm-up (EDGELM_GRAPH_WARM_ALL=0, as
# before), and with the graphs captured twice; then the README's latency tables and the graph tests.
# Run on 2026-12-06 (H100): 5.61, 5.61 and 5.53 ms; EDGELM_GRAPH_WARM_ALL was then removed (no effect).
source benchmarks/gpu/site_setup.sh
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 1024 --output-len 64 --repeat 3 --skip-peaks"
for env in X=0 EDGELM_GRAPH_WARM_ALL=0 EDGELM_GRAPH_RECAPTURE=1; do
  echo "== $env"; env $env timeout 60 $b 2>&1 | grep -v -i warn | tail -1
done
bash benchmarks/gpu/latency_run.sh
timeout 70 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_graph.py 2>&1 | tail -2
