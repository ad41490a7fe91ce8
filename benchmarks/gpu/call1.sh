set -x
source benchmarks/gpu/site_setup.sh
nvidia-smi -L
timeout 240 python3 -m pytest -q -m gpu tests/test_overlap_schedule.py 2>&1 | tail -15
timeout 300 python3 benchmarks/gpu/gemlite_eval.py --out $OUT/gemlite_eval_h100.json 2>&1 | grep -v "^\s*$" | tail -30
