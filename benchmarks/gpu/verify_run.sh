#!/usr/bin/env bash
# One device call (carry .whl; ~6 min): what the session of 2026-12-07 (thirteenth) left unverified on a GPU —
# the int4 GPU suites with cuda_w4 in the shipped tables (bf16 and fp16 tests; the seeded cuda_w4 reference bound;
# the alignment fallback), then the probe's second form (cuda_gemv_probe.py, cuda_w4 through int4_cuda, PDL on/off).
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
timeout ${TT:-330} python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_int4_cuda.py tests/test_int4.py \
    tests/test_gemv_h2.py tests/test_int4_fused.py tests/test_cuda_graph.py 2>&1 | tee $OUT/gpu_tests_int4_all.txt | tail -12
echo "($((SECONDS - t0)) s)"
timeout ${PT:-200} python3 benchmarks/gpu/cuda_gemv_probe.py --configs "2,2,8;2,4,4,1;1,2,8" \
    --out $OUT/cuda_gemv_probe_$dev.json 2>&1 | grep -v -i warn | cut -c1-200 | tail -40
echo "total $((SECONDS - t0)) s"
