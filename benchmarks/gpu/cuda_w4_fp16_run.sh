#!/usr/bin/env bash
# One device call (carry .whl; ~3.5 min): cuda_w4's GPU tests (fp16 activations included), then Llama-3.1-8B
# int4wo-128 with --dtype float16: int4_variants round 16 (qkv_proj / gate_up_proj back on gemv_h2 against the
# shipped cuda_w4) and the fp16 batch-1 step, int4 (shipped tables) and dense, in the same call.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_int4_cuda.py 2>&1 | tee $OUT/gpu_tests_int4_cuda_fp16.txt | tail -6
echo "($((SECONDS - t0)) s)"
m="--model-path llama-3.1-8b --load-format dummy --dtype float16"
timeout 100 python3 benchmarks/gpu/int4_variants.py $m --torchao-config int4wo-128 --batch-size 1 --input-len 1024 \
    --output-len 64 --candidates round16 --out $OUT/int4_variants_bs1_round16_fp16_$dev.json --dispatch-out /tmp/d16.json \
    2>&1 | grep -v -i warn | tail -10
echo "($((SECONDS - t0)) s)"
for q in int4wo-128 none; do
    timeout 80 python3 -m edgelm.bench_one_batch $m $([ $q != none ] && echo --torchao-config $q) --batch-size 1 \
        --input-len 1024 --output-len 64 --result-file $OUT/bench_one_batch_llama-3.1-8b_fp16_${q}_bs1_$dev.json \
        2>&1 | grep -v -i warn | tail -2
done
echo "total $((SECONDS - t0)) s"
