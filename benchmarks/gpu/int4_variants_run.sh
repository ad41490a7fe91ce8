#!/usr/bin/env bash
# One device call (carry .whl; ~6 min): int4wo-128 batch-1 decode variants of the M = 1 int4 kernel
# choices on one loaded Llama-3.1-8B-shape model (int4_variants.py); where a combination won, the
# int4wo-128 latency table (batch 1/8/32) and the int4 GPU tests with its tables (EDGELM_INT4_DISPATCH),
# and the bf16 batch-1 step in the same call for the ratio; where none won, the int4 GPU tests (TESTS=0: none).
# DEV=h100|h200 names the files; CANDS the rounds swept (int4_variants.py --candidates), VT its time limit;
# ABLATE=1 adds --ablate-gemv; FUSED=1 adds --fused-ab and then the int4wo-128 table with the fused int4
# layer on (the shipped tables; FUSED_BS its batch sizes). EXTRA_TESTS: more test files/ids for the GPU tests.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16"
timeout ${VT:-240} python3 benchmarks/gpu/int4_variants.py --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
    --torchao-config int4wo-128 --batch-size 1 --input-len 1024 --output-len 64 --candidates ${CANDS:-round2} ${ABLATE:+--ablate-gemv} ${FUSED:+--fused-ab} \
    --out $OUT/int4_variants_bs1_${ROUND:-round2}_$dev.json --dispatch-out $OUT/int4_dispatch_step_$dev.json 2>&1 | grep -v -i warn | tail -48
echo "($((SECONDS - t0)) s)"
if [ -n "$FUSED" ]; then
    ops=$(python3 -c "from edgelm.layers import triton_ops as t; print(','.join(sorted(t.DEFAULT_ON | {'fused_int4'})))")
    EDGELM_TRITON_OPS=$ops timeout 100 $b --torchao-config int4wo-128 --batch-size ${FUSED_BS:-1 8 32} --input-len 1024 \
        --output-len 64 --result-file $OUT/bench_one_batch_llama-3.1-8b_int4wo-128_fused_$dev.json 2>&1 | grep -v -i warn | tail -5
    echo "($((SECONDS - t0)) s)"
fi
if grep -q '"combo": "shipped"' $OUT/int4_dispatch_step_$dev.json 2>/dev/null || [ ! -f $OUT/int4_dispatch_step_$dev.json ]; then
    echo "no combination won: the int4 GPU tests with the shipped tables"
    [ "${TESTS:-1}" = 1 ] && timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_int4.py $EXTRA_TESTS 2>&1 | tee $OUT/gpu_tests_int4.txt | tail -3
    exit 0
fi
export EDGELM_INT4_DISPATCH=$OUT/int4_dispatch_step_$dev.json
timeout 100 $b --torchao-config int4wo-128 --batch-size ${BS:-1 8 32} --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_int4wo-128_$dev.json 2>&1 | grep -v -i warn | tail -5
echo "($((SECONDS - t0)) s)"
[ "${TESTS:-1}" = 1 ] && timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_int4.py $EXTRA_TESTS 2>&1 | tee $OUT/gpu_tests_int4.txt | tail -3
unset EDGELM_INT4_DISPATCH
echo "($((SECONDS - t0)) s)"
left=$(( ${BUDGET:-520} - (SECONDS - t0) ))
(( left > 50 )) && timeout $left $b --batch-size 1 --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_bs1_$dev.json 2>&1 | grep -v -i warn | tail -3
echo "total $((SECONDS - t0)) s"
