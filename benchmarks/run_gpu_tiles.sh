#!/usr/bin/env bash
# The GPU session behind the banded adapter's figures: install, check, measure, sweep.
# Usage: benchmarks/run_gpu_tiles.sh OUT_DIR BACKBONE [BUDGETS_MIB...]
set -uo pipefail
out=${1:?output folder}; backbone=${2:?backbone}; shift 2
source "$(dirname "$0")/gpu_session.sh"
start_session "$out"
if [ "$backbone" = vit_b ]; then
    python3 benchmarks/gpu_checks.py > "$out/gpu_checks.json"; echo "checks: rc $?"
    python3 benchmarks/tiles_speed.py 2>&1 | grep -v -i warn > "$out/tiles_speed.txt"
fi
bench_into "$out/${backbone}_tiles.json" \
    --backbones "$backbone" --methods cad-untiled cad cad-cache-untiled cad-cache \
    --precision fp32 bf16 --steps 8
for mib in "$@"; do  # band budgets to sweep
    bench_into "$out/${backbone}_tiles_${mib}mib.json" --backbones "$backbone" \
        --methods cad cad-cache --precision fp32 --steps 8 --set adapter_tile_mib="$mib"
done
