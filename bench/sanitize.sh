#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over small cases of every kernel
# (bench/sanitize_cases.py). Needs a built extension and a GPU. Prints one ERROR SUMMARY line per tool.
# Knobs: TOOLS (default all four), FAE_SANITIZE_ALGOS (comma list, default every family) and
# FAE_SANITIZE_CASES (indices into sanitize_cases.CASES; racecheck over all of
# them takes longer than one device call, so it is run per family).
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
for tool in ${TOOLS:-memcheck racecheck synccheck initcheck}; do
  # Only our kernels are checked (namespace fae; PyTorch's own kernels are not ours to fix). Older
  # sanitizers spell the filter --filter; fall back to it if --kernel-name is refused.
  # initcheck runs unfiltered: with a filter, PyTorch's kernels that write our inputs are not instrumented
  # and every input would look uninitialized.
  filter=(--kernel-name kns=fae); [ "$tool" = initcheck ] && filter=()
  compute-sanitizer --tool "$tool" "${filter[@]}" --print-limit 20 \
    python3 bench/sanitize_cases.py > "$OUT/sanitize_$tool.log" 2>&1
  rc=$?
  if [ ${#filter[@]} -gt 0 ] && grep -qiE "unrecognized|unknown option|invalid.*kernel-name" "$OUT/sanitize_$tool.log"; then
    compute-sanitizer --tool "$tool" --filter kns=fae --print-limit 20 \
      python3 bench/sanitize_cases.py > "$OUT/sanitize_$tool.log" 2>&1
    rc=$?
  fi
  grep -c "^ok" "$OUT/sanitize_$tool.log" | sed "s/^/  cases run under $tool: /"
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize_$tool.log" | tail -1)
  echo "$tool: rc=$rc ${summary:-no summary line}"
  if [ $rc -ne 0 ] || ! grep -qE "(ERROR|RACECHECK) SUMMARY: 0 (errors|hazards)" <<< "$summary"; then
    status=1; grep -E "=========" "$OUT/sanitize_$tool.log" | head -20
  fi
done
exit $status
