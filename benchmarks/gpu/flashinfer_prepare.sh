#!/usr/bin/env bash
# Build .fi/ (gitignored) for a device call that has no network (issue 7): FlashInfer's installed
# tree, xz-compressed (the 62 MB wheel is 426 MB unpacked, ~19 MB as .tar.xz), with the two JIT
# modules edgelm's FlashInfer backend needs for bf16 / head_dim 128 (Llama-3.1-8B and the GPU
# tests) compiled here by the local nvcc for sm_90a (H100) and placed in flashinfer's own AOT folder
# (data/aot/<module>/<module>.so, loaded without a build). Other shapes JIT-compile on the device
# from the headers in the same tree. Plus the small pure-python wheels `import flashinfer` needs.
#
#   bash benchmarks/gpu/flashinfer_prepare.sh      # here, where pip reaches a package index
#   device: bash benchmarks/gpu/flashinfer_run.sh  (carry .whl and .fi)
set -euo pipefail
FI_VERSION=${FI_VERSION:-0.7.2.post1}
root=$(cd "$(dirname "$0")/../.." && pwd)
work=${WORK:-/tmp/fi_prepare}
py=${PYTHON:-$root/.venv/bin/python}
mkdir -p "$work/wheels" "$root/.fi/wheels"
grep -qx '/.fi/' "$root/.git/info/exclude" || echo '/.fi/' >> "$root/.git/info/exclude"

"$py" -m pip download -q --no-deps -d "$work/wheels" "flashinfer-python==$FI_VERSION" einops tabulate nvidia-ml-py
rm -rf "$work/site" "$work/deps"
"$py" -m pip install -q --no-deps --no-compile --target "$work/site" "$work/wheels"/flashinfer_python-*.whl
"$py" -m pip install -q --no-deps --no-compile --target "$work/deps" "$work/wheels"/{einops,tabulate,nvidia_ml_py}-*.whl

# Prebuild the kernels. The JIT links -lcuda; no driver here, so a stub with the driver's soname
# (the modules end up needing only libcudart.so.13, which torch has loaded on the device).
if command -v nvcc > /dev/null; then
    mkdir -p "$work/custub"
    echo "" | gcc -shared -Wl,-soname,libcuda.so.1 -o "$work/custub/libcuda.so" -x c -
    export FLASHINFER_CUDA_ARCH_LIST=9.0 FLASHINFER_WORKSPACE_BASE="$work/jit" MAX_JOBS=${MAX_JOBS:-2}
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FLASHINFER_EXTRA_LDFLAGS="-L$work/custub"
    PYTHONPATH="$work/site:$work/deps" "$py" - "$work/site" <<'EOF'
import shutil, sys, time
from pathlib import Path

import torch
from flashinfer.jit.attention.modules import _gen_batch_prefill_primary_module, gen_batch_decode_module

aot = Path(sys.argv[1]) / "flashinfer" / "data" / "aot"
bf16, i32, hd = torch.bfloat16, torch.int32, 128
specs = [
    # ragged + paged prefill and tensor-core decode (what the wrappers' backend="fa2" asks for)
    _gen_batch_prefill_primary_module("fa2", bf16, bf16, bf16, i32, hd, hd, 0, False, False, False),
    # CUDA-core decode (fewer than 4 q heads per kv head)
    gen_batch_decode_module(bf16, bf16, bf16, i32, hd, hd, 0, False, False),
]
for spec in specs:
    t = time.time()
    spec.build(verbose=False)
    dest = aot / spec.name / f"{spec.name}.so"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(spec.jit_library_path, dest)
    print(f"{spec.name}: {time.time() - t:.0f} s, {dest.stat().st_size / 1e6:.1f} MB", flush=True)
EOF
else
    echo "no nvcc here: the device JIT-compiles the kernels at the backend's start-up" >&2
fi

(cd "$work/site" && tar -cf - flashinfer flashinfer_python-*.dist-info b12x | xz -T2 -6 > "$root/.fi/flashinfer_site.tar.xz")
cp "$work/wheels"/{einops,tabulate,nvidia_ml_py}-*.whl "$root/.fi/wheels/"
du -sh "$root/.fi" "$root/.fi"/* "$root/.whl"
