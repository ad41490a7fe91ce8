#!/usr/bin/env bash
# One device call for issue 7 (carry .whl and .fi; .fi is made by flashinfer_prepare.sh):
# install FlashInfer offline, benchmark the triton and flashinfer attention backends side by side
# (Llama-3.1-8B shape, random bf16 weights: decode at batch 1 and 32, 4k prefill) after the GPU
# tests (flashinfer against torch_native and against triton, CUDA graphs), then where the decode
# difference goes (flashinfer_overhead.py). Writes under $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
site=/tmp/site
{
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/*.whl .fi/wheels/*.whl
    tar -xJf .fi/flashinfer_site.tar.xz -C "$site" \
        || python3 -c "import tarfile; tarfile.open('.fi/flashinfer_site.tar.xz').extractall('$site')"
} > "$OUT/setup.log" 2>&1 || { echo "install failed"; tail -5 "$OUT/setup.log"; exit 1; }
export PYTHONPATH=$site:.
# FlashInfer's JIT (used only for kernels that .fi does not ship prebuilt): cache under /tmp, H100 only
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws FLASHINFER_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nvcc --version | tail -2
    python3 -c "import torch, flashinfer, importlib.metadata as m; print('torch', torch.__version__, 'flashinfer', \
flashinfer.__version__, 'tvm-ffi', m.version('apache-tvm-ffi'))"
    ls "$site/flashinfer/data/aot"
} >> "$OUT/setup.log" 2>&1
tail -8 "$OUT/setup.log"

EDGELM_TEST_STATS="$OUT/test_stats.jsonl" timeout 150 python3 -m pytest -q -p no:cacheprovider -rs \
    tests/test_flashinfer_backend.py > "$OUT/gpu_tests.txt" 2>&1
echo "flashinfer tests: exit $?"
grep -E "passed|failed|error" "$OUT/gpu_tests.txt" | tail -3
cat "$OUT/test_stats.jsonl" 2>/dev/null

bench() {  # name, timeout, bench_one_batch args...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy \
        --dtype bfloat16 --attention-backends triton flashinfer "$@" \
        --result-file "$OUT/attention_backends_llama-3.1-8b_bf16_${name}h100.json" >> "$OUT/bench.log" 2>&1
    echo "bench $name: exit $?"
    grep -E "^ +(triton|flashinfer) " "$OUT/bench.log" | tail -4
}
bench "" 100 --batch-size 1 32 --input-len 1024 --output-len 64 --repeat 2
bench prefill4k_ 60 --batch-size 1 --input-len 4096 --output-len 8 --repeat 3 --skip-peaks
grep -E "FlashInfer|Building JIT|attention backend" "$OUT/bench.log" | head -4

# where the decode gap goes: the replay hook's host time and one layer's attention in a graph
timeout 45 python3 benchmarks/gpu/flashinfer_overhead.py --out "$OUT/flashinfer_overhead_h100.json" \
    >> "$OUT/bench.log" 2>&1
echo "overhead: exit $?"
grep -E "replay hook" "$OUT/bench.log"
