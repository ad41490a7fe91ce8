#!/usr/bin/env bash
# Ran once at commit e393659 (H100, 2026-12-06; results in benchmarks/results/ablations/prefetch/). The prefetch and
# AHEAD switches it uses were removed after that run (measured slower or equal): it no longer runs as is.
# One device call (carry .whl; <= 9 min): batch-1 decode, Llama-3.1-8B shape, dummy weights, in one run:
# bf16 with the skinny GEMV's L2 prefetches before the PDL wait (EDGELM_GEMV_PREFETCH own,partner) against none;
# int4wo-128 with the built-in dispatch against the hand variants in int4_dispatch/ (AHEAD, PREFETCH);
# then which part of a second CUDA-graph capture speeds batch 1 (EDGELM_GRAPH_RECAPTURE, max-bs 1).
source benchmarks/gpu/site_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader
t0=$SECONDS
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 1024 --output-len 64 --repeat 3 --skip-peaks"
step() { # name env... -- args
  local name=$1; shift; local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  if (( SECONDS - t0 > ${BUDGET:-500} )); then echo "== $name skipped (time)"; return; fi
  local s=$SECONDS
  echo "== $name"; env "${envs[@]}" timeout 60 $b "$@" --result-file $OUT/$name.json 2>&1 | grep -v -i warn | tail -1
  echo "   ($((SECONDS - s)) s)"
}
step bs1_bf16_pf_0_0 EDGELM_GEMV_PREFETCH=0,0 --
step bs1_bf16_pf_1_1 EDGELM_GEMV_PREFETCH=1,1 --
step bs1_bf16_pf_1_0 EDGELM_GEMV_PREFETCH=1,0 --
step bs1_bf16_pf_0_0_again EDGELM_GEMV_PREFETCH=0,0 --
q="--torchao-config int4wo-128"
step bs1_int4_builtin X=0 -- $q
step bs1_int4_ahead_pf EDGELM_INT4_DISPATCH=benchmarks/gpu/int4_dispatch/ahead_pf.json -- $q
step bs1_int4_ahead EDGELM_INT4_DISPATCH=benchmarks/gpu/int4_dispatch/ahead.json -- $q
step bs1_int4_pf EDGELM_INT4_DISPATCH=benchmarks/gpu/int4_dispatch/pf.json -- $q
step rc_none X=0 -- --cuda-graph-max-bs 1
step rc_1 EDGELM_GRAPH_RECAPTURE=1 -- --cuda-graph-max-bs 1
step rc_keep EDGELM_GRAPH_RECAPTURE=keep -- --cuda-graph-max-bs 1
step rc_same EDGELM_GRAPH_RECAPTURE=same -- --cuda-graph-max-bs 1
echo "total $((SECONDS - t0)) s"
