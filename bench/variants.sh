#!/usr/bin/env bash
# Tuning: build each variant of the kernels (extra nvcc flags, ';'-separated list in VARIANTS) for the head
# dims in HEAD_DIMS and run bench/op_check.py (or the MEASURE command) against it, in one device call.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
IFS=';' read -ra list <<< "${VARIANTS:-}"
n=0
for flags in "${list[@]}"; do
  n=$((n+1)); echo "=== variant $n: $flags"
  rm -rf build flashattn_ext/_C*.so
  FLASHATTN_EXT_CUDA_ARCHS=90a FLASHATTN_EXT_HEAD_DIMS=${HEAD_DIMS:-128} FLASHATTN_EXT_NVCC_FLAGS="$flags" \
    MAX_JOBS=$(nproc) python3 setup.py build_ext --inplace > "$OUT/build_$n.log" 2>&1 || { tail -20 "$OUT/build_$n.log"; continue; }
  grep -E "spill stores" "$OUT/build_$n.log" | sort | uniq -c
  ${MEASURE:-env OP_CHECK_QUICK=1 python3 bench/op_check.py} 2>&1 | grep -E "${MEASURE_GREP:-FAIL|TFLOP|ALL}" | tee "$OUT/check_$n.log"
done
