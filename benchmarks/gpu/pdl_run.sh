#!/usr/bin/env bash
# One device call (carry .whl; ~8 min): programmatic dependent launch (triton_ops "pdl") on the
# H100. The GPU tests of the decode kernels and graphs (PDL on: the default), then bench_one_batch
# bf16 Llama-3.1-8B shape with PDL on and off (same overlapped loop), the plain loop for reference,
# the fused decoder layer with PDL, and a kernel profile of the PDL graph. DEV=h100|h200 names files.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"
python3 -c "import triton; from triton.backends.nvidia.compiler import CUDAOptions as O; print('triton', triton.__version__, 'launch_pdl' in O.__dataclass_fields__)"
timeout 170 python3 -m pytest -q -x -m gpu tests/test_cuda_graph.py tests/test_fused_ops.py tests/test_triton_attention.py \
    2>&1 | tail -4
NOPDL=rmsnorm,add_rmsnorm,silu_and_mul,rotary,gemv,argmax,rope_kv
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --input-len 1024 --output-len 64"
timeout 110 $b --batch-size 1 64 --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_pdl_$dev.json 2>&1 | grep -v -i warn | tail -4
EDGELM_TRITON_OPS=$NOPDL timeout 90 $b --batch-size 1 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_nopdl_$dev.json 2>&1 | grep -v -i warn | tail -3
timeout 90 $b --batch-size 1 --disable-overlap-schedule \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_pdl_nooverlap_$dev.json 2>&1 | grep -v -i warn | tail -3
EDGELM_TRITON_OPS=$NOPDL,fused_decode,pdl timeout 90 $b --batch-size 1 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_pdl_fused_$dev.json 2>&1 | grep -v -i warn | tail -3
timeout 90 python3 benchmarks/gpu/decode_profile.py --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
    --batch-size 1 --input-len 1024 --output-len 80 --skip-peaks \
    --out $OUT/decode_profile_llama-3.1-8b_bf16_bs1_pdl_$dev.json 2>&1 | grep -v -i warn | tail -3
