#!/usr/bin/env bash
# One device call (carry .whl; ~9.5 min): the int4wo-128 batch-1 sweep of $CANDS (default rounds 6-7) with the
# A/B of the triton_ops switches $OPS (int4_variants.py --ops-ab; default int4_xprep,int4_rope), then the two
# headline tables in one call — bf16 batch 1/8/32/64 and int4wo-128 batch 1/8/32, the int4 one with the
# sweep's winning tables (EDGELM_INT4_DISPATCH) and with each switch on whose every run beat every shipped
# baseline of the A/B — then the int4 GPU tests (GEMV on prepared x, kernels, fused forms, fused/PDL model
# tests) in what time is left under BUDGET. int4_xprep goes into the table only if its GPU tests pass.
# BF16_BS / INT4_BS: the tables' batch sizes. H2L (optional): h2_limits.py variants timed after the switches'
# tests (e.g. full,prep,prep_gemv).
source benchmarks/gpu/site_setup.sh
dev=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)}
echo "DEV=$dev"; t0=$SECONDS
m="--model-path llama-3.1-8b --load-format dummy --dtype bfloat16"
OPS=${OPS:-int4_xprep,int4_rope}
if [[ ,$OPS, == *,int4_xprep* ]]; then  # int4_xprep / int4_xprep_qkv: their GPU tests first
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_int4_xprep.py \
        tests/test_cuda_graph.py::test_int4_xprep_matches_plain 2>&1 | tee $OUT/gpu_tests_int4_xprep.txt | tail -3
    # a failing test keeps it out of the int4 table (still timed in the A/B: the numbers say what it would give)
    grep -q "failed\|error" $OUT/gpu_tests_int4_xprep.txt && NOT_OK="int4_xprep int4_xprep_qkv"
    echo "OPS=$OPS not for the table: ${NOT_OK:-none} ($((SECONDS - t0)) s)"
fi
if [ -n "${H2L:-}" ]; then  # the batch-1 GEMVs alone (h2_limits.py variants), before the whole-step timings
    timeout ${H2T:-90} python3 benchmarks/gpu/h2_limits.py --variants $H2L --out $OUT/h2_limits_${H2L//,/_}_$dev.json \
        2>&1 | grep -v -i warn | tail -20
    echo "($((SECONDS - t0)) s)"
fi
b="python3 -m edgelm.bench_one_batch $m"
timeout ${VT:-270} python3 benchmarks/gpu/int4_variants.py $m --torchao-config int4wo-128 --batch-size 1 --input-len 1024 \
    --output-len 64 --candidates ${CANDS:-round6,round7} --ops-ab $OPS --out $OUT/int4_variants_bs1_round67_$dev.json \
    --dispatch-out $OUT/int4_dispatch_step_$dev.json 2>&1 | grep -v -i warn | tail -30
echo "($((SECONDS - t0)) s)"
# a switch goes into the table only if each run with it (alone) beat every shipped baseline of the A/B
ops=$(python3 - $OUT/int4_variants_bs1_round67_$dev.json $OPS ${NOT_OK:-} <<'PY'
import json, sys
from edgelm.layers import triton_ops as t
try:
    rs = json.load(open(sys.argv[1]))["results"]
except (OSError, KeyError, ValueError):
    rs = []
base = [r["itl_us"] for r in rs if r.get("label") == "shipped (A/B baseline)"]
won = {}
for op in sys.argv[2].split(","):
    if op in sys.argv[3:]:
        continue
    runs = [r["itl_us"] for r in rs if r.get("ops_added") == op]
    if base and len(runs) == 2 and max(runs) < min(base):
        won[op] = sum(runs) / 2
# switches that change the same GEMV (qkv_proj: its rotary epilogue or x prepared): the faster one alone
for pair in (("int4_rope", "int4_xprep_qkv"), ("int4_xprep", "int4_xprep_qkv")):
    if all(op in won for op in pair):
        del won[max(pair, key=won.get)]
print(",".join(sorted(set(t.DEFAULT_ON) | set(won))))
PY
)
echo "triton ops for the int4 table: $ops"
timeout 100 $b --batch-size ${BF16_BS:-1 8 32 64} --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_bf16_$dev.json 2>&1 | grep -v -i warn | tail -5
echo "($((SECONDS - t0)) s)"
if grep -q '"combo": "shipped"' $OUT/int4_dispatch_step_$dev.json 2>/dev/null || [ ! -f $OUT/int4_dispatch_step_$dev.json ]; then
    echo "no combination won: the int4 table with the shipped tables"
else
    export EDGELM_INT4_DISPATCH=$OUT/int4_dispatch_step_$dev.json
fi
EDGELM_TRITON_OPS=$ops timeout 110 $b --torchao-config int4wo-128 --batch-size ${INT4_BS:-1 8 32} --input-len 1024 --output-len 64 \
    --result-file $OUT/bench_one_batch_llama-3.1-8b_int4wo-128_$dev.json 2>&1 | grep -v -i warn | tail -5
unset EDGELM_INT4_DISPATCH
echo "($((SECONDS - t0)) s)"
left=$(( ${BUDGET:-570} - (SECONDS - t0) ))
(( left > 30 )) && timeout $left python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_int4_fused.py \
    tests/test_cuda_graph.py::test_fused_int4_layers_match_unfused tests/test_cuda_graph.py::test_pdl_decode_matches_plain_launches \
    tests/test_int4.py tests/test_gemv_h2.py 2>&1 | tee $OUT/gpu_tests_int4.txt | tail -4
echo "total $((SECONDS - t0)) s"
