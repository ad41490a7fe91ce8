# One device call (carry .whl): the overlap-scheduling GPU test, then gemlite against edgelm int4 (gemlite_eval.py).
set -x
source benchmarks/gpu/site_setup.sh
nvidia-smi -L
timeout 240 python3 -m pytest -q -m gpu tests/test_overlap_schedule.py 2>&1 | tail -15
timeout 300 python3 benchmarks/gpu/gemlite_eval.py --out $OUT/gemlite_eval_h200.json 2>&1 | grep -v "^\s*$" | tail -30
