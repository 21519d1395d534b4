#!/usr/bin/env bash
# Build and run the standalone Hopper backward probe (bench/fa3_bwd_probe.cu) on the device, each run under a
# timeout (a hung mbarrier wait must not burn the whole call). Extra nvcc flags: $PROBE_FLAGS.
# Logs: $OUT/bwd_probe_build.log, bwd_probe_check.log, bwd_probe_time.log.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
NVCC="nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo -Xptxas -v -Icsrc"
rm -f /tmp/fa3_bwd_probe
$NVCC ${PROBE_FLAGS:-} bench/fa3_bwd_probe.cu -o /tmp/fa3_bwd_probe > "$OUT/bwd_probe_build.log" 2>&1
grep -E "error|C75|injected|fa3_bwd_dkdv" -A2 "$OUT/bwd_probe_build.log" | grep -E "error|C75|injected|spill|Used" | head -20
test -x /tmp/fa3_bwd_probe || { tail -20 "$OUT/bwd_probe_build.log"; exit 1; }
timeout 120 /tmp/fa3_bwd_probe check 2>&1 | tee "$OUT/bwd_probe_check.log"; rc=${PIPESTATUS[0]}
echo "check rc=$rc"
if [ "$rc" = 0 ]; then timeout 180 /tmp/fa3_bwd_probe time 2>&1 | tee "$OUT/bwd_probe_time.log"; fi
exit $rc
