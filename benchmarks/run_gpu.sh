#!/usr/bin/env bash
# The GPU session behind benchmarks/: install, check the fast paths, measure.
# Usage: benchmarks/run_gpu.sh OUT_DIR [cadsam bench arguments...]
set -uo pipefail
out=${1:?output folder}; shift
source "$(dirname "$0")/gpu_session.sh"
start_session "$out"
python3 benchmarks/gpu_checks.py | tee "$out/gpu_checks.json"
cadsam bench --out "$out" "$@"
