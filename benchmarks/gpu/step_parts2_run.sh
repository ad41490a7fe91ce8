source benchmarks/gpu/site_setup.sh
t0=$SECONDS
timeout 60 python3 benchmarks/gpu/cuda_gemv_probe.py --debug 2>&1 | grep -v -i warn | tail -20
echo "($((SECONDS - t0)) s)"
timeout 300 python3 benchmarks/gpu/int4_variants.py --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
    --torchao-config int4wo-128 --batch-size 1 --input-len 1024 --output-len 64 --candidates none \
    --ablate-ops silu,rmsnorm,merge --ops-ab attn_merge --out $OUT/int4_step_parts_llama-3.1-8b_h100.json \
    --dispatch-out /tmp/d_8b.json > /tmp/parts.log 2>&1; echo rc=$?
grep -v -i warn /tmp/parts.log | grep -v "^frame" | head -60
echo "total $((SECONDS - t0)) s"
