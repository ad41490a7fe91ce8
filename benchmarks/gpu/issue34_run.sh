#!/usr/bin/env bash
# One device call (carry .whl; ~8 min) for issues 3 and 4 on whatever GPU the device is (DEV=h100|h200 names
# the files): GPU tests of the decode and int4 kernels, the int4 launch-config sweep (it applies to the
# rest through EDGELM_INT4_DISPATCH: commit its dispatch tables into int4_kernels.py if they win), int4 vs
# bf16 through the scheduler loop in one run, and bs-1 decode profiles with attn_merge off / on.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-h100}
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_int4.py tests/test_triton_attention.py \
    tests/test_fused_ops.py tests/test_cuda_graph.py tests/test_overlap_schedule.py tests/test_prequantized.py 2>&1 | tail -4
timeout 200 python3 benchmarks/gpu/int4_bench.py --tune --tune-budget ${TUNE_BUDGET:-120} \
    --tune-out $OUT/int4_tune_$dev.json --out $OUT/int4_$dev.json 2>&1 | grep -v -i warn | tail -20
export EDGELM_INT4_DISPATCH=$OUT/int4_tune_$dev.json
timeout 220 python3 benchmarks/int4_speedup.py --model-path llama-3.1-8b --tokenizer-path .whl/smollm2-135m-config \
    --batch-sizes 1 8 32 --out $OUT/int4_speedup_llama-3.1-8b_$dev.json 2>&1 | grep -v -i warn | tail -7
for ops in 1 rmsnorm,add_rmsnorm,silu_and_mul,rotary,gemv,argmax,rope_kv,attn_merge; do
  EDGELM_TRITON_OPS=$ops timeout 100 python3 benchmarks/gpu/decode_profile.py --model-path llama-3.1-8b \
      --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 1024 --output-len 80 --skip-peaks \
      --out $OUT/decode_profile_llama-3.1-8b_bf16_bs1_$([ $ops = 1 ] && echo default || echo attn-merge)_$dev.json 2>&1 | grep -v -i warn | head -2
done
