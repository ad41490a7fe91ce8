#!/usr/bin/env bash
# One device call: serve the Llama-3.1-8B layer shapes (random weights, SmolLM2's tokenizer and
# vocabulary: no Llama-3 tokenizer travels) on the GPU, drive it with edgelm.bench_serving at
# concurrency 1..64, write the JSON under $OUT, stop the server.
# Usage on the device (wheels installed): WHL=.sw bash benchmarks/gpu/serving_run.sh
# Env overrides for a local dry run: MODEL_ARGS, BENCH_ARGS, PORT.
set -u
WHL=${WHL:-.whl}
export PYTHONPATH=${PYTHONPATH:-}:.
OUT=${OUT:-/tmp/out}
PORT=${PORT:-30000}
MODEL=${MODEL:-$WHL/llama-3.1-8b-body-smollm2-vocab}
MODEL_ARGS=${MODEL_ARGS:---model-path $MODEL --load-format dummy --dtype bfloat16 --device cuda --attention-backend triton --mem-fraction-static 0.8 --context-length 4096 --max-running-requests 128}
BENCH_ARGS=${BENCH_ARGS:---tokenizer $MODEL --num-prompts 48 --random-input-len 512 --random-output-len 128 --max-concurrencies 1,8,32,64}
if [ -n "${ENGINE_BASELINE:-}" ]; then  # the same model without HTTP: batch-1 decode for the ratio
  timeout 150 python -m edgelm.bench_one_batch --model-path "$MODEL" --load-format dummy --dtype bfloat16 \
      --batch-size 1 8 32 64 --input-len 512 --output-len 64 --result-file "$OUT/bench_one_batch_engine_baseline.json" \
      > "$OUT/bench_one_batch.log" 2>&1
  tail -8 "$OUT/bench_one_batch.log"
fi
SERVER_CMD="python -m edgelm.launch_server $MODEL_ARGS --port $PORT"
$SERVER_CMD > "$OUT/server.log" 2>&1 &
PID=$!
for i in $(seq 1 300); do
  python - "$PORT" <<'PY' && break
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2)
except Exception:
    sys.exit(1)
PY
  kill -0 $PID 2>/dev/null || { echo "server exited"; tail -30 "$OUT/server.log"; exit 1; }
  sleep 1
done
grep -E "model |KV pool|CUDA graphs" "$OUT/server.log" | tail -3
RESULT="$OUT/bench_serving_${RESULT_NAME:-llama-3.1-8b-body_h100}.json"
BENCH_CMD="python -m edgelm.bench_serving --port $PORT --backend openai-chat --dataset-name random $BENCH_ARGS --random-range-ratio 1 --seed 1 --output-file $RESULT"
$BENCH_CMD > "$OUT/bench.log" 2>&1
tail -12 "$OUT/bench.log"
python - "$RESULT" "$SERVER_CMD" "$BENCH_CMD" <<'PY'
import json, platform, sys
import torch
path, server_cmd, bench_cmd = sys.argv[1:]
d = json.load(open(path))
d["server_command"] = server_cmd
d["command"] = bench_cmd
d["machine"] = {"cpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
                "machine": platform.machine()}
json.dump(d, open(path, "w"), indent=1)
PY
kill -TERM $PID; wait $PID
tail -3 "$OUT/server.log"
