#!/usr/bin/env bash
# Not run yet (2026-12-06: no device could be started for the rest of the session). One device call (carry .whl): which part of a second CUDA-graph capture makes batch-1 decode faster
# (EDGELM_GRAPH_RECAPTURE: 1 = new runner after freeing the first, keep = new runner with the first alive,
# same = capture again into the same runner), with all batch sizes and with batch 1 only.
source benchmarks/gpu/site_setup.sh
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 1024 --output-len 64 --repeat 3 --skip-peaks"
for v in "X=0" "EDGELM_GRAPH_RECAPTURE=1" "EDGELM_GRAPH_RECAPTURE=keep" "EDGELM_GRAPH_RECAPTURE=same" "X=1" \
         "X=0;--cuda-graph-max-bs 1" "EDGELM_GRAPH_RECAPTURE=1;--cuda-graph-max-bs 1"; do
  env=${v%%;*}; extra=""; [[ $v == *";"* ]] && extra=${v#*;}
  echo "== $env $extra"; env $env timeout 60 $b $extra 2>&1 | grep -v -i warn | tail -1
done
