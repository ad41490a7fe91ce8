#!/usr/bin/env bash
# One device call (carry .whl): the GPU tests of the fused decode ops, then a bs-1 decode-step profile of
# the Llama-3.1-8B shape with the fused rotary+KV write, in-kernel attention merge and split argmax off
# (the op set before them) and on (the default). Results under $OUT.
source benchmarks/gpu/site_setup.sh
timeout 250 python3 -m pytest -q -p no:cacheprovider -m gpu -x tests/test_cuda_graph.py tests/test_fused_ops.py \
    tests/test_triton_attention.py 2>&1 | tail -4
for ops in rmsnorm,add_rmsnorm,silu_and_mul,rotary,gemv,argmax 1; do
  echo "== EDGELM_TRITON_OPS=$ops"
  EDGELM_TRITON_OPS=$ops timeout 150 python3 benchmarks/gpu/decode_profile.py --model-path llama-3.1-8b \
      --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 1024 --output-len 80 --skip-peaks \
      --out $OUT/profile_$ops.json 2>&1 | grep -v -i warn | grep -v "'op'" | head -30
done
