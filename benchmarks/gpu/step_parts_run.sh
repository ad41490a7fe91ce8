#!/usr/bin/env bash
# One device call (carry .whl; ~7 min): where the int4wo-128 batch-1 step could still shrink on Llama-3.1-8B.
# 1. the gemv_h2 GPU tests; 2. Qwen2.5-1.5B's round 12 sweep (unswept_run.sh's, JSON only); 3. int4_variants.py on
# Llama-3.1-8B: the shipped step with RMSNorm / SiLU·mul / the attention merge each launching nothing
# (--ablate-ops) and the attention merge inside the attention launch A/B (--ops-ab attn_merge); 4. the hand-written
# CUDA GEMV probe (cuda_gemv_probe.py) beside gemv_h2 on the four Llama-3.1-8B shapes.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gemv_h2.py 2>&1 | tee $OUT/gpu_tests_gemv_h2.txt | tail -3
echo "($((SECONDS - t0)) s)"
if [ "${QWEN:-1}" = 1 ]; then
    timeout 100 python3 benchmarks/gpu/int4_variants.py --model-path edgelm/configs/qwen2.5-1.5b --load-format dummy \
        --dtype bfloat16 --torchao-config int4wo-128 --batch-size 1 --input-len 1024 --output-len 64 --candidates round12 \
        --out $OUT/int4_variants_bs1_round12_qwen2.5-1.5b_$dev.json --dispatch-out /tmp/d_qwen.json 2>&1 | grep -v -i warn | tail -16
    echo "($((SECONDS - t0)) s)"
fi
timeout ${AT:-240} python3 benchmarks/gpu/int4_variants.py --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
    --torchao-config int4wo-128 --batch-size 1 --input-len 1024 --output-len 64 --candidates none \
    --ablate-ops rmsnorm,silu,merge --ops-ab attn_merge --out $OUT/int4_step_parts_llama-3.1-8b_$dev.json \
    --dispatch-out /tmp/d_8b.json 2>&1 | grep -v -i warn | tail -20
echo "($((SECONDS - t0)) s)"
timeout ${PT:-200} python3 benchmarks/gpu/cuda_gemv_probe.py ${PCONF:+--configs "$PCONF"} --out $OUT/cuda_gemv_probe_$dev.json 2>&1 \
    | grep -v -i warn | cut -c1-220 | tail -70
echo "total $((SECONDS - t0)) s"
