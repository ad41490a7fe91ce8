#!/usr/bin/env bash
# One device call (carry .whl; <= 7 min): the README's Llama-3.1-8B-shape latency figures with the batch-1
# graph captured twice (the default since 2026-12-06) — bf16 at batch 1/8/32/64 and int4wo-128 at batch 1/8/32 —
# batch 1 with EDGELM_GRAPH_RECAPTURE=0 beside it, the CUDA-graph and int4 GPU tests, then the 4k prefill if
# time is left. DEV=h100|h200 names the files.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16"
timeout 200 $b --batch-size 1 8 32 64 --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_$dev.json 2>&1 | grep -v -i warn | tail -6
echo "($((SECONDS - t0)) s)"
for rc in 0 1; do
  EDGELM_GRAPH_RECAPTURE=$rc timeout 60 $b --batch-size 1 --input-len 1024 --output-len 64 --repeat 3 --skip-peaks \
      --cuda-graph-max-bs 1 --result-file $OUT/recapture_${rc}_bs1_$dev.json 2>&1 | grep -v -i warn | tail -1
done
echo "($((SECONDS - t0)) s)"
timeout 170 $b --torchao-config int4wo-128 --batch-size 1 8 32 --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_int4wo-128_$dev.json 2>&1 | grep -v -i warn | tail -5
echo "($((SECONDS - t0)) s)"
left=$(( ${BUDGET:-360} - (SECONDS - t0) ))
timeout $(( left > 20 ? left : 20 )) python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_cuda_graph.py tests/test_int4.py \
    2>&1 | tee $OUT/gpu_tests.txt | tail -4
echo "($((SECONDS - t0)) s)"
if (( SECONDS - t0 < ${BUDGET:-360} - 60 )); then
  timeout 75 $b --batch-size 1 --input-len 4096 --output-len 8 \
      --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_prefill4k_$dev.json 2>&1 | grep -v -i warn | tail -3
fi
echo "total $((SECONDS - t0)) s"
