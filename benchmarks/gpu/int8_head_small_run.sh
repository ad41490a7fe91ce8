#!/usr/bin/env bash
# One device call (carry .whl; ~5 min): --quantize-lm-head int8 on the small models whose heads weigh most against
# their int4 layers (Llama-3.2-3B, Qwen2.5-1.5B; tied heads): their heads alone, then batch-1 decode int4wo-128 with
# and without the int8 head and bf16, each model in the same call. MODELS: which; HEADBENCH=0: no head sweep;
# TESTS=1: the int8 head's GPU tests first.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
[ "${TESTS:-0}" = 1 ] && timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_int8_head.py 2>&1 \
    | tee $OUT/gpu_tests_int8_head.txt | tail -4
[ "${HEADBENCH:-1}" = 1 ] && timeout 90 python3 benchmarks/gpu/int8_head_bench.py --shapes llama-3.2-3b,qwen2.5-1.5b --rows 1 \
    --out $OUT/int8_head_bench_small_$dev.json 2>&1 | grep -v -i warn | tail -3
for model in ${MODELS:-llama-3.2-3b qwen2.5-1.5b}; do
    m="--model-path edgelm/configs/$model --load-format dummy --dtype bfloat16 --input-len 1024 --output-len 64 --batch-size 1"
    for run in "int4wo-128_int8head:--torchao-config int4wo-128 --quantize-lm-head int8" "int4wo-128_bs1:--torchao-config int4wo-128" \
               "bf16_bs1:"; do
        timeout 90 python3 -m edgelm.bench_one_batch $m ${run#*:} --result-file $OUT/bench_one_batch_${model}_${run%%:*}_$dev.json \
            2>&1 | grep -v -i warn | tail -1
        echo "$model ${run%%:*} ($((SECONDS - t0)) s)"
    done
done
echo "total $((SECONDS - t0)) s"
