# Sourced by the device scripts: install the carried wheels (.whl, and .fi's FlashInfer when carried) into
# /tmp/site and export PYTHONPATH and FlashInfer's settings. Needs OUT set; exits the caller on failure.
site=/tmp/site
wheels=(.whl/*.whl)
[ -d .fi ] && wheels+=(.fi/wheels/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${wheels[@]}" > "$OUT/setup.log" 2>&1 || { tail -5 "$OUT/setup.log"; exit 1; }
if [ -d .fi ]; then tar -xJf .fi/flashinfer_site.tar.xz -C "$site" >> "$OUT/setup.log" 2>&1 || exit 1; fi
export PYTHONPATH=$site:. PYTHONUNBUFFERED=1 FLASHINFER_WORKSPACE_BASE=/tmp/fiws FLASHINFER_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
