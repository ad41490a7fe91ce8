#!/usr/bin/env bash
# One device call (carry .whl; ~4 min; not yet run): decode attention with each split's first K/V block
# loaded before the PDL wait (DecodeConfig.prefetch_kv, EDGELM_DECODE_CONFIG=prefetch_kv=1) against the
# default, batch 1, bf16 and int4wo-128, alternating off/on/off/on in one call; then the attention GPU tests.
# DEV=h100|h200 names the files.
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
b="python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 1024 --output-len 64 --skip-peaks"
for quant in bf16 int4wo-128; do
    q=""; [ $quant != bf16 ] && q="--torchao-config $quant"
    for run in off on off2 on2; do
        cfg=""; [[ $run == on* ]] && cfg="prefetch_kv=1"
        EDGELM_DECODE_CONFIG=$cfg timeout 90 $b $q --result-file $OUT/prefetch_kv_${quant}_${run}_$dev.json 2>&1 \
            | grep -v -i warn | tail -1 | sed "s/^/$quant $run: /"
    done
    echo "($((SECONDS - t0)) s)"
done
EDGELM_DECODE_CONFIG=prefetch_kv=1 timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_triton_attention.py \
    tests/test_cuda_graph.py 2>&1 | tee $OUT/gpu_tests_prefetch_kv.txt | tail -3
echo "total $((SECONDS - t0)) s"
