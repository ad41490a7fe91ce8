#!/usr/bin/env bash
# Run by jetson-containers inside the built image (the package folder is mounted at /test):
# report the platform, then serve the embedded SmolLM2-135M on the GPU and ask it one question
# through the OpenAI API.
set -ex

python3 -c 'import edgelm; print("edgelm", edgelm.__version__)'
python3 -m edgelm.check_env
python3 -m edgelm.check_env --json > /tmp/edgelm-doctor.json
python3 -c '
import json, sys
r = json.load(open("/tmp/edgelm-doctor.json"))
print(r["description"])
if r["platform"]["device"] != "cuda":
    sys.exit("torch sees no CUDA GPU in this container (run it with --runtime nvidia)")
'

PORT="${EDGELM_TEST_PORT:-30080}"
BACKEND="${EDGELM_TEST_BACKEND:-triton}"
python3 -m edgelm.launch_server --device cuda --attention-backend "$BACKEND" \
    --context-length 2048 --port "$PORT" > /tmp/edgelm-server.log 2>&1 &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true; tail -n 40 /tmp/edgelm-server.log' EXIT

python3 - "$PORT" <<'PY'
import json, sys, time, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(300):
    try:
        urllib.request.urlopen(base + "/health", timeout=2)
        break
    except OSError:
        time.sleep(1)
else:
    sys.exit("the server did not come up in 300 s")
model = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
body = json.dumps({"model": model, "max_tokens": 16, "temperature": 0,
                   "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
req = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=120))
text = reply["choices"][0]["message"]["content"]
print("reply:", repr(text), "usage:", reply.get("usage"))
assert text.strip(), "empty reply"
PY

echo "edgelm OK"
