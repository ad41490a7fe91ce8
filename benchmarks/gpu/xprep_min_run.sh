#!/usr/bin/env bash
# The shortest device call for int4_xprep (carry .whl; ~4.5 min): its GPU tests, its GEMVs alone with the
# pairs loaded either way (h2_limits.py, variants $H2L; prep_gemv@1: int4_ptx.PREP_FORM 1), the int4wo-128
# batch-1 step with it on/off/on around the shipped step (int4_variants.py --ops-ab $AB, default int4_xprep and
# int4_xprep_qkv: qkv_proj alone on prepared x; the form
# EDGELM_INT4_PREP_FORM says, default 2), bf16 batch 1 in the same call for the ratio. File names carry the
# GPU (h100/h200).
source benchmarks/gpu/site_setup.sh
dev=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)
echo "DEV=$dev"; t0=$SECONDS
m="--model-path llama-3.1-8b --load-format dummy --dtype bfloat16"
timeout ${TT:-90} python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_int4_xprep.py \
    tests/test_cuda_graph.py::test_int4_xprep_matches_plain tests/test_cuda_graph.py::test_l2_prefetch_changes_nothing 2>&1 | tee $OUT/gpu_tests_int4_xprep_$dev.txt | tail -3
echo "($((SECONDS - t0)) s)"
timeout ${HT:-80} python3 benchmarks/gpu/h2_limits.py --variants ${H2L:-full,prep_gemv@1,prep_gemv,l2hot} \
    --out $OUT/h2_limits_prep_forms_$dev.json 2>&1 | grep -v -i warn | tail -12
echo "($((SECONDS - t0)) s)"
timeout ${VT:-110} python3 benchmarks/gpu/int4_variants.py $m --torchao-config int4wo-128 --batch-size 1 --input-len 1024 \
    --output-len 64 --candidates none --ops-ab ${AB:-int4_xprep,int4_xprep_qkv,l2_prefetch,l2_prefetch@30,int4_rope} --out $OUT/int4_variants_bs1_xprep_$dev.json 2>&1 | grep -v -i warn | tail -14
echo "($((SECONDS - t0)) s)"
timeout ${BT:-40} python3 -m edgelm.bench_one_batch $m --batch-size 1 --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_bs1_$dev.json 2>&1 | grep -v -i warn | tail -2
if [ -n "${BF16PF:-}" ]; then  # bf16 batch 1 with l2_prefetch too (o_proj's weights, a third of the L2)
    ops=$(python3 -c 'from edgelm.layers import triton_ops as t; print(",".join(sorted(t.DEFAULT_ON | {"l2_prefetch"})))')
    EDGELM_TRITON_OPS=$ops timeout ${BT:-40} python3 -m edgelm.bench_one_batch $m --batch-size 1 --input-len 1024 \
        --output-len 64 --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_bs1_l2pf_$dev.json 2>&1 | grep -v -i warn | tail -2
fi
echo "total $((SECONDS - t0)) s"
