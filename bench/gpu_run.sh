#!/usr/bin/env bash
# One device call: build (all cores), raw-op check, GPU tests, bench; logs under $OUT (or ./out).
# Knobs: ARCHS (default 90a while iterating), HEAD_DIMS (default all), ALGOS (bench_fwd algorithms, default fa3,fa2),
# STEPS (default "build check test bench"; also probe, selfcheck, sanitize, fuzzslow, benchbwd, benchdecode,
# generate, overhead, traingpt, window), TEST_ARGS, TEST_TIMEOUT, BWD_ALGOS, DECODE_ARGS.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
STEPS=${STEPS:-build check test bench}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' | tee -a "$OUT/device.txt"
for step in $STEPS; do
  echo "=== $step"; start=$(date +%s)
  case $step in
    build)
      rm -rf build flashattn_ext/_C*.so
      FLASHATTN_EXT_CUDA_ARCHS=${ARCHS:-90a} FLASHATTN_EXT_HEAD_DIMS=${HEAD_DIMS:-} MAX_JOBS=$(nproc) \
        python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      grep -E "spill|registers" "$OUT/build.log" | sort | uniq -c | head -20 ;;
    check) python3 bench/op_check.py 2>&1 | tee "$OUT/check.log" || status=1 ;;
    test) timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q --maxfail=25 tests -rs ${TEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -40 || status=1 ;;
    probe) bash bench/fa3_probe.sh || status=1 ;;
    selfcheck) python3 -m flashattn_ext 2>&1 | tee "$OUT/selfcheck.log" || status=1 ;;
    sanitize) bash bench/sanitize.sh 2>&1 | tee "$OUT/sanitize.log" || status=1 ;;
    fuzzslow) python3 -m pytest -q -m slow tests/test_fuzz.py tests/test_kvcache_fuzz.py 2>&1 | tail -5 | tee "$OUT/fuzz_slow.log" || status=1 ;;
    benchbwd) python3 bench/bench_bwd.py --algorithms ${BWD_ALGOS:-fa2} --out "$OUT" 2>&1 | tee "$OUT/bench_bwd.log" || status=1 ;;
    overhead) python3 bench/bench_overhead.py --out "$OUT" 2>&1 | tee "$OUT/bench_overhead.log" || status=1 ;;
    benchdecode) python3 bench/bench_decode.py ${DECODE_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench_decode.log" || status=1 ;;
    generate) python3 examples/generate.py 2>&1 | tee "$OUT/generate.log" || status=1 ;;
    traingpt) python3 examples/train_gpt.py --out "$OUT" 2>&1 | tee "$OUT/train_gpt.log" || status=1 ;;
    window) python3 bench/bench_window.py --issue --out "$OUT" 2>&1 | tee "$OUT/bench_window.log" || status=1 ;;
    bench) python3 bench/bench_fwd.py --algorithms ${ALGOS:-fa3,fa2} --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "=== $step took $(( $(date +%s) - start )) s"
done
exit $status
