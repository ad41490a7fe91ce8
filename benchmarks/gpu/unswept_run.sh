#!/usr/bin/env bash
# One device call (carry .whl; ~8 min): models whose int4 batch-1 shapes no sweep had timed (SHAPE_DISPATCH has no
# entry; their configs are their roles', int4_kernels.M1_BY_ROLE). The gemv_h2 GPU tests (their shapes included),
# then for each of $MODELS (shipped configs under edgelm/configs, random weights): int4_variants.py round 12
# (DISPATCH's old default and neighbours, role by role, against the role defaults) and the batch-1 decode step of
# int4wo-128 with the shipped tables against bf16 in the same call. VT: each sweep's time limit.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gemv_h2.py 2>&1 | tee $OUT/gpu_tests_gemv_h2.txt | tail -3
echo "($((SECONDS - t0)) s)"
for model in ${MODELS:-llama-3.2-3b qwen2.5-1.5b}; do
    m="--model-path edgelm/configs/$model --load-format dummy --dtype bfloat16"
    timeout ${VT:-150} python3 benchmarks/gpu/int4_variants.py $m --torchao-config int4wo-128 --batch-size 1 \
        --input-len 1024 --output-len 64 --candidates ${CANDS:-round12} --out $OUT/int4_variants_bs1_round12_${model}_$dev.json \
        --dispatch-out $OUT/int4_dispatch_${model}_$dev.json 2>&1 | grep -v -i warn | tail -20
    echo "($((SECONDS - t0)) s)"
    for q in bf16 int4wo-128; do
        timeout 90 python3 -m edgelm.bench_one_batch $m $([ $q != bf16 ] && echo --torchao-config $q) \
            --batch-size 1 --input-len 1024 --output-len 64 \
            --result-file $OUT/bench_one_batch_${model}_${q}_$dev.json 2>&1 | grep -v -i warn | tail -3
    done
    echo "($((SECONDS - t0)) s)"
done
echo "total $((SECONDS - t0)) s"
