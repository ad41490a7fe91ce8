#!/usr/bin/env bash
# One device call (carry .whl): GPU tests of the int4 and decode kernels; the int4 launch-config sweep
# (its dispatch table then applies to the rest through EDGELM_INT4_DISPATCH); a bs-1 decode profile
# with the in-kernel attention merge on and off; then int4wo-128 vs bf16 through the scheduler loop.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-h200}
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_int4.py tests/test_triton_attention.py \
    tests/test_fused_ops.py tests/test_cuda_graph.py 2>&1 | tail -6
timeout 200 python3 benchmarks/gpu/int4_bench.py --tune --tune-budget ${TUNE_BUDGET:-110} \
    --tune-out $OUT/int4_tune_$dev.json --out $OUT/int4_$dev.json 2>&1 | grep -v -i warn | tail -36
export EDGELM_INT4_DISPATCH=$OUT/int4_tune_$dev.json
for ops in 1 rmsnorm,add_rmsnorm,silu_and_mul,rotary,gemv,argmax,rope_kv; do
  echo "== EDGELM_TRITON_OPS=$ops"
  EDGELM_TRITON_OPS=$ops timeout 100 python3 benchmarks/gpu/decode_profile.py --model-path llama-3.1-8b \
      --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 1024 --output-len 80 --skip-peaks \
      --out $OUT/profile_${ops//,/_}.json 2>&1 | grep -v -i warn | grep -v "'op'" | head -12
done
timeout 260 python3 benchmarks/int4_speedup.py --model-path llama-3.1-8b --tokenizer-path .whl/smollm2-135m-config \
    --batch-sizes 1 8 32 --out $OUT/int4_speedup_llama-3.1-8b_$dev.json 2>&1 | grep -v -i warn | tail -12
