#!/usr/bin/env bash
# The GPU session behind the reused-input figures: memory at the peak, then the banded and
# whole-block adapter in the same runs. Usage: benchmarks/run_gpu_reuse.sh OUT_DIR
set -uo pipefail
out=${1:?output folder}
source "$(dirname "$0")/gpu_session.sh"
start_session "$out"
for precision in fp32 bf16; do
    python3 benchmarks/memory_peak.py cad-cache $precision 2>&1 | grep -v -i warn
done > "$out/memory_peak.txt"
bench_into "$out/vit_b_reuse.json" \
    --backbones vit_b --methods cad-untiled cad cad-cache-untiled cad-cache \
    --precision fp32 bf16 --steps 8
bench_into "$out/vit_h_reuse.json" \
    --backbones vit_h --methods cad-untiled cad cad-cache-untiled cad-cache \
    --precision fp32 --steps 5
