#!/usr/bin/env bash
# Build and run the standalone Hopper backward probe (bench/fa3_bwd_probe.cu) on the device, each run under a
# timeout (a hung mbarrier wait must not burn the whole call): check, then (if it passed) time, for each
# variant in $VARIANTS (space-separated; a variant is "base" = the defaults, or comma-separated nvcc -D
# macros). Logs under $OUT: bwd_probe_<variant>_*.log. SANITIZE=1 adds compute-sanitizer memcheck of one small
# causal GQA shape per variant.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
NVCC="nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo -Xptxas -v -Icsrc"
VARIANTS=${VARIANTS:-"base FAE_FA3_BWD_DQ_SPLIT=1 FAE_FA3_BWD_DQ_BULK=1 FAE_FA3_BWD_DQ_SPLIT=1,FAE_FA3_BWD_DQ_BULK=1"}
status=0
for variant in $VARIANTS; do
  flags=""; [ "$variant" != base ] && flags="-D${variant//,/ -D}"
  tag=$(echo "$variant" | tr '=,' '_-'); bin=/tmp/fa3_bwd_probe_$tag
  echo "=== variant $variant"
  rm -f "$bin"
  $NVCC $flags ${PROBE_FLAGS:-} bench/fa3_bwd_probe.cu -o "$bin" > "$OUT/bwd_probe_${tag}_build.log" 2>&1
  grep -E "error|C75|injected" "$OUT/bwd_probe_${tag}_build.log" | head -5
  grep -A2 "Compiling entry function.*fa3_bwd_d" "$OUT/bwd_probe_${tag}_build.log" | grep -E "spill" | sort | uniq -c
  test -x "$bin" || { tail -20 "$OUT/bwd_probe_${tag}_build.log"; status=1; continue; }
  timeout 60 "$bin" check 2>&1 | tee "$OUT/bwd_probe_${tag}_check.log"; rc=${PIPESTATUS[0]}
  echo "check rc=$rc"
  if [ "$rc" = 0 ]; then timeout 90 "$bin" time 2>&1 | tee "$OUT/bwd_probe_${tag}_time.log"; else status=1; fi
  if [ "${SANITIZE:-0}" = 1 ]; then
    timeout 120 compute-sanitizer --tool memcheck --print-limit 10 "$bin" one 128 1 4 2 333 1 \
      > "$OUT/bwd_probe_${tag}_memcheck.log" 2>&1
    echo "memcheck rc=$? $(grep -E "ERROR SUMMARY" "$OUT/bwd_probe_${tag}_memcheck.log" | tail -1)"
  fi
done
exit $status
