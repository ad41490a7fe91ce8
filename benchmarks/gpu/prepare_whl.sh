#!/usr/bin/env bash
# Builds .whl (gitignored), what most device scripts carry: py3.12 x86_64 wheels the GPU image lacks
# (xgrammar, pyzmq, pydantic, gguf, gemlite) and smollm2-135m-config (the embedded model's config and
# tokenizer, written by transformers from the GGUF). Run here, on the CPU machine, from the repo root.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.whl
mkdir -p "$out"
py=${PY:-.venv/bin/python}
for p in xgrammar pyzmq pydantic pydantic_core gguf annotated_types typing_inspection; do
    pip download -q --no-deps --python-version 3.12 --platform manylinux_2_28_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --only-binary=:all: -d "$out" "$p" \
        2>&1 | grep -v "^WARNING: Location" || true
done
# gemlite ships as an sdist only (pure Python + Triton): build its wheel here
pip wheel -q --no-deps -w "$out" "gemlite==${GEMLITE_VERSION:-0.6.0.post2}" 2>&1 | grep -v "^WARNING: Location" || true
PYTHONPATH=. "$py" - <<'PY'
import os
from transformers import AutoConfig, AutoTokenizer
from edgelm.model_loader.resolve import embedded_model_path
path = embedded_model_path()
d, f = os.path.dirname(path), os.path.basename(path)
out = ".whl/smollm2-135m-config"
AutoConfig.from_pretrained(d, gguf_file=f).save_pretrained(out)
AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(out)
print(sorted(os.listdir(out)))
PY
du -sh "$out"; ls "$out"
