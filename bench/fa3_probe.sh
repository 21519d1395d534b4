#!/usr/bin/env bash
# Build and run the standalone Hopper forward probe (bench/fa3_probe.cu) on the device, each run under a
# timeout (a hung mbarrier wait must not burn the whole call). Extra nvcc flags: $PROBE_FLAGS.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
NVCC="nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo -Icsrc"
$NVCC ${PROBE_FLAGS:-} bench/fa3_probe.cu -o /tmp/fa3_probe 2>&1 | grep -E "error" ; test -x /tmp/fa3_probe || exit 1
timeout 60 /tmp/fa3_probe check 2>&1 | tee "$OUT/probe_check.log"; rc=${PIPESTATUS[0]}
echo "check rc=$rc"
if [ "$rc" = 0 ]; then timeout 120 /tmp/fa3_probe time 2>&1 | tee "$OUT/probe_time.log"; fi
exit $rc
