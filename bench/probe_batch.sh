#!/usr/bin/env bash
# One device call's worth of Hopper kernel experiments, without torch: builds every variant of the standalone
# forward and backward probes in parallel, then checks and times each (under timeouts: a hung mbarrier wait
# must not burn the call), then profiles one shape of each with ncu.
#   FWD_VARIANTS / BWD_VARIANTS: space-separated; "base" = the defaults, "ref" = the kernels under $REF_CSRC (default
#   .ab_main/csrc, e.g. `git archive main csrc | tar -x -C .ab_main`: an A/B against another tree in the same
#   call), else comma-separated -D macros
#   NCU=0 skips the profiles; NCU_FWD / NCU_BWD: the probe's "one" arguments of the profiled shape;
#   NCU_SOURCE=1 adds per-SASS-instruction warp stall samples (ncu_<fwd|bwd>_source.csv)
#   KINDS: "fwd bwd" (default), or one of them alone; TIME_ROUNDS: timing rounds (default 1), variants alternating
# Logs under $OUT (or /tmp/o): probe_<fwd|bwd>_<variant>.log, ncu_<fwd|bwd>.log.
set -uo pipefail
OUT=${OUT:-/tmp/o}; mkdir -p "$OUT"
NVCC="nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo -Xptxas -v"
REF_CSRC=${REF_CSRC:-.ab_main/csrc}
FWD_VARIANTS=${FWD_VARIANTS:-base}
BWD_VARIANTS=${BWD_VARIANTS:-base}
KINDS=${KINDS:-fwd bwd}
tag_of() { echo "$1" | tr '=,' '_-'; }
flags_of() {
  case $1 in base) echo "-Icsrc" ;; ref) echo "-I$REF_CSRC -Icsrc" ;; *) echo "-Icsrc -D${1//,/ -D}" ;; esac
}

for kind in $KINDS; do
  vars=$FWD_VARIANTS; src=bench/fa3_probe.cu
  [ $kind = bwd ] && { vars=$BWD_VARIANTS; src=bench/fa3_bwd_probe.cu; }
  for v in $vars; do
    t=$(tag_of "$v")
    $NVCC $(flags_of "$v") $src -o /tmp/probe_${kind}_$t > "$OUT/probe_${kind}_${t}.log" 2>&1 &
  done
done
wait

# Checks first; then TIME_ROUNDS rounds of timing, the variants alternating inside each round and each round
# starting one variant later (drift in the card's clocks over the call then reaches every variant alike), and a table of each shape's median over rounds.
for kind in $KINDS; do
  vars=$FWD_VARIANTS; [ $kind = bwd ] && vars=$BWD_VARIANTS
  passed=""
  for v in $vars; do
    t=$(tag_of "$v"); bin=/tmp/probe_${kind}_$t; log="$OUT/probe_${kind}_${t}.log"
    echo "=== $kind $v: $(grep -c 'spill stores' "$log") kernels, spills: $(grep -oE '[1-9][0-9]* bytes spill stores' "$log" | sort | uniq -c | tr '\n' ' ')"
    test -x "$bin" || { grep -m5 error "$log"; continue; }
    timeout 90 "$bin" check >> "$log" 2>&1; rc=$?
    echo "check rc=$rc $(grep -E 'CHECK|FAIL' "$log" | head -3 | tr '\n' ' ')"
    [ $rc = 0 ] && passed="$passed $v"
  done
  for round in $(seq 1 ${TIME_ROUNDS:-1}); do
    set -- $passed
    for k in $(seq 2 $round); do set -- "${@:2}" "$1"; done  # each round starts one variant later
    for v in "$@"; do
      t=$(tag_of "$v")
      timeout 120 /tmp/probe_${kind}_$t time 2>&1 | sed "s/^time/time r$round/" >> "$OUT/probe_${kind}_${t}.log"
    done
  done
  for v in $passed; do
    echo "--- $kind $v (median over ${TIME_ROUNDS:-1} rounds, TFLOP/s)"
    python3 - "$OUT/probe_${kind}_$(tag_of "$v").log" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"time r\d+ (.*?)\s+[\d.]+ ms\s+(\d+) TFLOP/s", line)
    if m: rows.setdefault(m.group(1).strip(), []).append(int(m.group(2)))
for shape, tf in rows.items(): print(f"{shape:40s} {statistics.median(tf):6.0f}   {tf}")
PY
  done
done

if [ "${NCU:-1}" = 1 ] && command -v ncu > /dev/null; then
  sections="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
            --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section SchedulerStats
            --section LaunchStats --section Occupancy"
  metrics="sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed,lts__t_bytes.sum.per_second,sm__cycles_elapsed.avg.per_second,smsp__inst_executed.sum"
  for kind in $KINDS; do
    vars=$FWD_VARIANTS; kern=fa3_fwd; shape=${NCU_FWD:-128 1 16 16384 0}
    [ $kind = bwd ] && { vars=$BWD_VARIANTS; kern=fa3_bwd_dkdv; shape=${NCU_BWD:-128 1 16 16 16384 0}; }
    first=$(echo $vars | cut -d' ' -f1)
    timeout 150 ncu --clock-control none -k regex:$kern --launch-skip 2 --launch-count 1 $sections --metrics $metrics \
      /tmp/probe_${kind}_$(tag_of "$first") one $shape > "$OUT/ncu_${kind}.log" 2>&1
    echo "ncu $kind rc=$?"
  done
  if [ "${NCU_SOURCE:-0}" = 1 ]; then
    for kind in $KINDS; do
      vars=$FWD_VARIANTS; kern=fa3_fwd; shape=${NCU_FWD:-128 1 16 16384 0}
      [ $kind = bwd ] && { vars=$BWD_VARIANTS; kern=fa3_bwd_dkdv; shape=${NCU_BWD:-128 1 16 16 16384 0}; }
      first=$(echo $vars | cut -d' ' -f1)
      timeout 150 ncu --clock-control none -k regex:$kern --launch-skip 2 --launch-count 1 --section SourceCounters \
        --section WarpStateStats --page source --print-source sass --csv /tmp/probe_${kind}_$(tag_of "$first") one $shape \
        > "$OUT/ncu_${kind}_source.csv" 2>&1
      echo "ncu $kind source rc=$? $(wc -l < "$OUT/ncu_${kind}_source.csv") lines"
    done
  fi
fi
