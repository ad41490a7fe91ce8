#!/usr/bin/env bash
# One device call: grammar bitmask costs, then decode overhead with a JSON schema (batch 1, 16):
# the embedded SmolLM2-135M GGUF with its real weights (when $GGUF names it: it is too big to carry in
# one call, see the README's benchmark notes), and dummy weights in the Llama-3.1-8B layer shapes (with
# SmolLM2's vocabulary: no Llama-3 tokenizer travels) and the SmolLM2-1.7B / 135M shapes.
# Each decode-overhead run times the constrained steps with the grammar work on the scheduler thread
# and on the fill threads (--grammar-fill-threads; the default on a 16-core host is 8).
# Usage on the device: WHL=.gw GGUF=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf bash benchmarks/gpu/grammar_run.sh
# (APPLY=0 skips the bitmask micro-benchmark; MODELS names the dummy-weight shapes to run)
set -u
WHL=${WHL:-.whl}
export PYTHONPATH=${PYTHONPATH:-}:.
OUT=${OUT:-/tmp/out}
[ "${APPLY:-1}" = 1 ] && timeout 60 python benchmarks/gpu/grammar_apply_bench.py --tokenizer $WHL/smollm2-135m-config \
    --out "$OUT/grammar_apply_h100.json" 2>&1 | tail -12
if [ -n "${GGUF:-}" ]; then
  timeout 170 python benchmarks/grammar_overhead.py --model-path "$GGUF" \
      --out "$OUT/grammar_overhead_smollm2-135m-gguf_h100.json" > "$OUT/grammar_gguf.log" 2>&1
  grep -E "^batch" "$OUT/grammar_gguf.log" || tail -20 "$OUT/grammar_gguf.log"
fi
for m in ${MODELS:-llama-3.1-8b-body-smollm2-vocab smollm2-135m-config}; do
  timeout 170 python benchmarks/grammar_overhead.py --model-path $WHL/$m --load-format dummy \
      --out "$OUT/grammar_overhead_${m%-config}-dummy_h100.json" > "$OUT/grammar_$m.log" 2>&1
  grep -E "^batch" "$OUT/grammar_$m.log" || tail -20 "$OUT/grammar_$m.log"
done
