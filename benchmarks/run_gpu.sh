#!/usr/bin/env bash
# The GPU session behind benchmarks/: install, check the fast paths, measure.
# Usage: benchmarks/run_gpu.sh OUT_DIR [cadsam bench arguments...]
set -uo pipefail
out=${1:?output folder}; shift
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 benchmarks/gpu_checks.py | tee "$out/gpu_checks.json"
PYTHONUNBUFFERED=1 cadsam bench --out "$out" "$@"
