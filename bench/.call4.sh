export PYTHONPATH=$PWD; mkdir -p /tmp/o
OUT=/tmp/o STEPS=build bash bench/gpu_run.sh > /tmp/o/run.txt 2>&1 || { tail -30 /tmp/o/build.log; cp -r /tmp/o/* $OUT/; exit 1; }
timeout 60 python -m pytest -x -q tests/test_kvcache.py -k "heads8_3s and page_sizes" > /tmp/o/smoke.log 2>&1; echo "smoke rc=$?"; tail -2 /tmp/o/smoke.log
timeout 200 python -m pytest -q tests/test_kvcache.py tests/test_kvcache_fuzz.py tests/test_generate_example.py > /tmp/o/kv_tests.log 2>&1; echo "kv tests rc=$?"; tail -4 /tmp/o/kv_tests.log
timeout 200 python bench/bench_decode.py --variants heads4_3s heads8_3s bulk_4w3s --out /tmp/o > /tmp/o/bench_decode.log 2>&1; echo "bench rc=$?"
OUT=/tmp/o TOOLS="memcheck racecheck" FAE_SANITIZE_ALGOS=decode timeout 200 bash bench/sanitize.sh > /tmp/o/sanitize.txt 2>&1; echo "sanitize rc=$?"; cat /tmp/o/sanitize.txt | head
cp -r /tmp/o/*.log /tmp/o/*.json /tmp/o/*.txt $OUT/ 2>/dev/null
grep -A24 "^B x L " /tmp/o/bench_decode.log | cut -c1-60,150-200 | head -26
grep -B2 -A24 "per variant: TB/s" /tmp/o/bench_decode.log | head -60
grep -A5 "chunked prefill" /tmp/o/bench_decode.log | cut -c1-120
