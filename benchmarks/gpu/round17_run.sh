#!/usr/bin/env bash
# One device call (carry .whl; ~9 min): cuda_w4's split K and down_proj's SiLU·mul staging (int4_cuda.py). Its GPU
# tests, int4_variants.py round 17 on Llama-3.1-8B (split-K configs on o_proj and down_proj, SiLU·mul taken into
# down_proj), where a combination won the int4wo-128 table with its tables (EDGELM_INT4_DISPATCH) and bf16 batch 1
# in the same call; then cuda_gemv_probe.py (each GEMV alone) with the time left. OPSAB: --ops-ab (e.g. -int4_rope:
# qkv_proj's cuda_w4 rotary epilogue off against on); HEADLINE=0: no table after the sweep;
# HEADLINE=shipped: the table with the shipped tables; TESTS=0: no GPU tests.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
[ "${TESTS:-1}" = 1 ] && timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_int4_cuda.py 2>&1 | tee $OUT/gpu_tests_int4_cuda.txt | tail -15
echo "($((SECONDS - t0)) s)"
m="--model-path llama-3.1-8b --load-format dummy --dtype bfloat16"
timeout ${VT:-240} python3 benchmarks/gpu/int4_variants.py $m --torchao-config int4wo-128 --batch-size 1 --input-len 1024 \
    --output-len 64 --candidates ${CANDS:-round17} ${OPSAB:+--ops-ab $OPSAB} --out $OUT/int4_variants_bs1_${ROUND:-round17}_$dev.json \
    --dispatch-out $OUT/int4_dispatch_${ROUND:-round17}_$dev.json 2>&1 | grep -v -i warn | tail -24
echo "($((SECONDS - t0)) s)"
if [ "${HEADLINE:-1}" = 0 ]; then
    echo "(HEADLINE=0: no table)"
elif [ "${HEADLINE:-1}" = shipped ]; then  # the table with the shipped tables, whatever the sweep found
    timeout 100 python3 -m edgelm.bench_one_batch $m --torchao-config int4wo-128 --batch-size ${BS:-1} --input-len 1024 \
        --output-len 64 --result-file $OUT/bench_one_batch_llama-3.1-8b_int4wo-128_$dev.json 2>&1 | grep -v -i warn | tail -4
    timeout 100 python3 -m edgelm.bench_one_batch $m --batch-size 1 --input-len 1024 --output-len 64 \
        --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_bs1_$dev.json 2>&1 | grep -v -i warn | tail -3
elif grep -q '"combo": "shipped"' $OUT/int4_dispatch_${ROUND:-round17}_$dev.json 2>/dev/null || [ ! -f $OUT/int4_dispatch_${ROUND:-round17}_$dev.json ]; then
    echo "no combination won"
else
    EDGELM_INT4_DISPATCH=$OUT/int4_dispatch_${ROUND:-round17}_$dev.json timeout 100 python3 -m edgelm.bench_one_batch $m \
        --torchao-config int4wo-128 --batch-size ${BS:-1} --input-len 1024 --output-len 64 \
        --result-file $OUT/bench_one_batch_llama-3.1-8b_int4wo-128_${ROUND:-round17}_$dev.json 2>&1 | grep -v -i warn | tail -4
    timeout 100 python3 -m edgelm.bench_one_batch $m --batch-size 1 --input-len 1024 --output-len 64 \
        --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_bs1_$dev.json 2>&1 | grep -v -i warn | tail -3
fi
echo "($((SECONDS - t0)) s)"
left=$(( ${BUDGET:-560} - (SECONDS - t0) ))
(( left > 40 )) && timeout $left python3 benchmarks/gpu/cuda_gemv_probe.py --configs "${PROBE:-2,2,8;2,4,4,1;2,2,8,0,4;2,4,4,1,4;1,4,8,0,2;2,2,8,0,8}" \
    --out $OUT/cuda_gemv_probe_$dev.json 2>&1 | grep -v -i warn | cut -c1-160 | tail -50
echo "total $((SECONDS - t0)) s"
