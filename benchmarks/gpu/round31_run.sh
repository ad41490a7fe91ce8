#!/usr/bin/env bash
# One device call (carry .whl; ~9 min): int4_variants.py round 31 on the other shipped model configs (random weights),
# whose batch-1 shapes still run gemv_h2: cuda_w4 role by role with Llama-3.1-8B's shipped forms. For each of
# $MODELS: the sweep, then, where a combination won, the int4wo-128 batch-1 step with its tables
# (EDGELM_INT4_DISPATCH) and bf16 batch 1 in the same call. VT: each sweep's time limit.
set -u
OUT=${OUT:-/tmp/out}
source benchmarks/gpu/site_setup.sh
dev=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)
t0=$SECONDS
for model in ${MODELS:-llama-3.2-3b qwen2.5-7b qwen2.5-1.5b}; do
    m="--model-path edgelm/configs/$model --load-format dummy --dtype bfloat16"
    d=$OUT/int4_dispatch_round31_${model}_$dev.json
    timeout ${VT:-150} python3 benchmarks/gpu/int4_variants.py $m --torchao-config int4wo-128 --batch-size 1 \
        --input-len 1024 --output-len 64 --candidates round31 --out $OUT/int4_variants_bs1_round31_${model}_$dev.json \
        --dispatch-out $d 2>&1 | grep -v -i warn | tail -12
    if [ -f $d ] && ! grep -q '"combo": "shipped"' $d; then
        EDGELM_INT4_DISPATCH=$d timeout 60 python3 -m edgelm.bench_one_batch $m --torchao-config int4wo-128 \
            --batch-size 1 --input-len 1024 --output-len 64 --skip-peaks \
            --result-file $OUT/bench_one_batch_${model}_int4wo-128_round31_$dev.json 2>&1 | grep -v -i warn | tail -2
        timeout 60 python3 -m edgelm.bench_one_batch $m --batch-size 1 --input-len 1024 --output-len 64 --skip-peaks \
            --result-file $OUT/bench_one_batch_${model}_bf16_bs1_$dev.json 2>&1 | grep -v -i warn | tail -2
    fi
    echo "($((SECONDS - t0)) s)"
done
echo "total $((SECONDS - t0)) s"
