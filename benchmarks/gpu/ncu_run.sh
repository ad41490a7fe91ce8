#!/usr/bin/env bash
# Nsight Compute reports of the batch-1 GEMVs (int4 gemv_h2 and bf16 skinny GEMM, Llama-3.1-8B shapes):
# the "details" page of each (CSV) and the int4 kernels' per-SASS-instruction stall samples ("source" page),
# tarred into $OUT/ncu_gemv.tar.gz. Run on the device from the repo root with OUT set:
#     bash benchmarks/gpu/ncu_run.sh
set -u
dir=/tmp/ncu; mkdir -p $dir
ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $ncu_bin" > $dir/info.txt; $ncu_bin --version >> $dir/info.txt 2>&1

# profile REPORT_NAME SOURCE_PAGE(0/1) ncu_gemv.py-arguments...: one launch (after 4), its pages as CSV
profile() {
  local rep=$dir/$1 source=$2; shift 2
  timeout 120 $ncu_bin --clock-control none --set full --import-source no -k 'regex:gemv_h2|gemv_w4|skinny' \
    --launch-skip 4 --launch-count 1 -f -o $rep python3 benchmarks/gpu/ncu_gemv.py "$@" > $rep.log 2>&1
  $ncu_bin -i $rep.ncu-rep --page details --csv > $rep.details.csv 2>> $rep.log
  if [ $source = 1 ]; then
    $ncu_bin -i $rep.ncu-rep --page source --csv --print-source sass > $rep.source.csv 2>> $rep.log
  fi
}

for shape in ${SHAPES_NCU:-qkv_proj o_proj gate_up_proj down_proj}; do
  for dt in ${DTYPES_NCU:-int4 bf16}; do
    profile ${dt}_${shape} $([ $dt = int4 ] && echo 1 || echo 0) --shape $shape --dtype $dt
  done
done
# NCU_EXTRA="gate_up_proj=16,8,1,4,4 down_proj=8,16,1,4,3+meta ...": int4 reports of other gemv_h2 configs too
# (+meta: with the scales and offsets paired, int4_meta_pairs)
for case in ${NCU_EXTRA:-}; do
  shape=${case%%=*}; cfg=${case#*=}; meta=""
  if [[ $cfg == *+meta ]]; then cfg=${cfg%+meta}; meta="--meta"; fi
  profile int4_${shape}_${cfg//,/_}${meta:+_meta} 1 --shape $shape --config $cfg $meta
done
rm -f $dir/*.ncu-rep
tar -czf $OUT/ncu_gemv.tar.gz -C $dir .
