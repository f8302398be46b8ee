#!/usr/bin/env bash
# The GPU tier on a device machine, as recorded under benchmarks/results/: the test references
# from carried wheels (.whl/), the real data from a carried copy (.testdata/), the project on
# PYTHONPATH; every argument goes to scripts/test --gpu (e.g. -k to run part of the tier).
#   CADSAM_GPU_MEMORY_GIB=24 benchmarks/gpu_tier.sh -k "not slow"   (logs in $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH=/tmp/site:$PWD/src CADSAM_TEST_DATA=$PWD/.testdata PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    >> "$out/gpu.txt"
git rev-parse HEAD >> "$out/gpu.txt" 2>/dev/null
scripts/test --gpu -v --timeout=240 "$@" 2>&1 | tee "$out/gpu_tier.log"
