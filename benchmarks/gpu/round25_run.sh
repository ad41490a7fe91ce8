#!/usr/bin/env bash
# One device call (carry .whl; ~9 min): GPU tests of cuda_w4 (its persistent form among them) and of the decode
# attention; then int4_variants.py on Llama-3.1-8B int4wo-128 batch 1: CANDS (default round25: cuda_w4's
# persistent form on gate_up / o / down) and, if set, ENVAB (--env-ab, e.g. "EDGELM_DECODE_CONFIG=min_split_len=128") and
# OPSAB (--ops-ab, e.g. attn_merge). TESTS=0: no tests; TESTS=all: the int8 head's GPU tests too.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
tests="tests/test_int4_cuda.py tests/test_triton_attention.py${TK:+ -k $TK}"
[ "${TESTS:-1}" = all ] && tests="$tests tests/test_int8_head.py"
[ "${TESTS:-1}" != 0 ] && timeout ${TT:-150} python3 -m pytest -q -p no:cacheprovider -m gpu -rs $tests 2>&1 \
    | tee $OUT/gpu_tests_${ROUND:-round25}.txt | grep -v -i warn | tail -8
echo "($((SECONDS - t0)) s)"
m="--model-path llama-3.1-8b --load-format dummy --dtype bfloat16"
timeout ${VT:-360} python3 benchmarks/gpu/int4_variants.py $m --torchao-config int4wo-128 --batch-size 1 --input-len 1024 \
    --output-len 64 --candidates ${CANDS:-round25} ${ENVAB:+--env-ab "$ENVAB"} ${OPSAB:+--ops-ab $OPSAB} \
    --out $OUT/int4_variants_bs1_${ROUND:-round25}_$dev.json --dispatch-out $OUT/int4_dispatch_${ROUND:-round25}_$dev.json \
    2>&1 | grep -v -i warn | tail -20
echo "total $((SECONDS - t0)) s"
