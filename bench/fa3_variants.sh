#!/usr/bin/env bash
# Runs bench/fa3_probe.sh once per variant (nvcc -D flags), in one device call: check + time each.
for v in "$@"; do echo "##### variant: ${v:-default}"; PROBE_FLAGS="$v" bash bench/fa3_probe.sh 2>&1 | grep -E "FAIL|PASS|time|rc="; done
