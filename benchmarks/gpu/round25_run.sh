#!/usr/bin/env bash
# One device call (carry .whl; ~9 min): the decode attention's merge read in one load (DecodeConfig.merge_vector)
# against the loop over splits, the in-kernel merge (attn_merge), fewer splits; GPU tests of the attention and the
# int8 head first. int4_variants.py on Llama-3.1-8B int4wo-128 batch 1 (--env-ab / --ops-ab), then a profile of the
# shipped step with the time left. TESTS=0: no tests; ENVAB / OPSAB: the A/B settings.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
[ "${TESTS:-1}" = 1 ] && timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_triton_attention.py \
    tests/test_int8_head.py 2>&1 | tee $OUT/gpu_tests_round25.txt | tail -8
echo "($((SECONDS - t0)) s)"
m="--model-path llama-3.1-8b --load-format dummy --dtype bfloat16"
timeout ${VT:-330} python3 benchmarks/gpu/int4_variants.py $m --torchao-config int4wo-128 --batch-size 1 --input-len 1024 \
    --output-len 64 --candidates none --env-ab "${ENVAB-EDGELM_DECODE_CONFIG=merge_vector=0;EDGELM_DECODE_CONFIG=min_split_len=128}" \
    ${OPSAB:+--ops-ab $OPSAB} --out $OUT/int4_variants_bs1_${ROUND:-round25}_$dev.json 2>&1 | grep -v -i warn | tail -16
echo "($((SECONDS - t0)) s)"
left=$(( ${BUDGET:-560} - (SECONDS - t0) ))
(( left > 60 )) && timeout $left python3 benchmarks/gpu/decode_profile.py $m --torchao-config int4wo-128 --batch-size 1 \
    --input-len 1024 --output-len 80 --skip-peaks --out $OUT/decode_profile_llama-3.1-8b_int4wo-128_bs1_$dev.json 2>&1 \
    | grep -v -i warn | tail -30
echo "total $((SECONDS - t0)) s"
