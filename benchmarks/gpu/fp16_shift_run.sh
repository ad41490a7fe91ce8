#!/usr/bin/env bash
# One device call (carry .whl; ~4 min): gemv_h2's fp16 one-shift word (int4_ptx._dot_pairs_asm) — the int4
# GPU tests (kernels in fp16 and bf16, fused forms, the fp16 graph-vs-eager model test), then int4wo-128 batch-1
# decode with --dtype float16 in the one-shift and the three-shift form (EDGELM_INT4_FP16_SHIFTS=3), twice each,
# alternating, and the fp16 dense model at batch 1 for the ratio.
source benchmarks/gpu/site_setup.sh
t0=$SECONDS
timeout ${TT:-170} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_int4.py tests/test_gemv_h2.py tests/test_int4_fused.py \
    tests/test_cuda_graph.py::test_int4_model_graph_decode_matches_eager > $OUT/gpu_tests_fp16_shift.txt 2>&1
tail -2 $OUT/gpu_tests_fp16_shift.txt; echo "($((SECONDS - t0)) s)"
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype float16 --batch-size 1 --input-len 1024 --output-len 64"
for i in 1 2; do
    timeout 60 $b --torchao-config int4wo-128 --result-file $OUT/fp16_int4_1shift_$i.json 2>&1 | grep "decode"
    EDGELM_INT4_FP16_SHIFTS=3 timeout 60 $b --torchao-config int4wo-128 --result-file $OUT/fp16_int4_3shift_$i.json 2>&1 | grep "decode"
done
timeout 60 $b --result-file $OUT/fp16_dense.json 2>&1 | grep "decode"
echo "total $((SECONDS - t0)) s"
