#!/usr/bin/env bash
# One device call (carry .whl; ~6 min): int4_variants.py round 14 (cuda_w4 with the late PDL release) on
# Llama-3.1-8B, then the int4 GPU suites (kernels, gemv_h2 shapes, cuda_w4, CUDA graphs) with the shipped tables.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
timeout ${VT:-200} python3 benchmarks/gpu/int4_variants.py --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
    --torchao-config int4wo-128 --batch-size 1 --input-len 1024 --output-len 64 --candidates ${CANDS:-round14} \
    --out $OUT/int4_variants_bs1_round14_$dev.json --dispatch-out /tmp/d14.json 2>&1 | grep -v -i warn | tail -16
echo "($((SECONDS - t0)) s)"
timeout ${TT:-300} python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_int4.py tests/test_gemv_h2.py \
    tests/test_int4_cuda.py tests/test_int4_fused.py tests/test_cuda_graph.py 2>&1 | tee $OUT/gpu_tests_int4_all.txt | tail -12
echo "total $((SECONDS - t0)) s"
